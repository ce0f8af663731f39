//! A lean HTTP/1.1 client on hyper: one connection per simulated client, no pooling, so the
//! load generator costs little per request.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr`, from `local` if given (several loopback source addresses keep 10k
/// connections clear of ephemeral-port exhaustion).
pub async fn tcp(addr: SocketAddr, local: Option<IpAddr>) -> Result<TcpStream> {
    let stream = match local {
        Some(ip) => {
            let sock = TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Source address for the `i`-th of many connections: 127.0.0.2, .3, … in blocks of 5000.
pub fn source_ip(i: usize) -> Option<IpAddr> {
    Some(IpAddr::from([127, 0, 0, 2 + (i / 5000) as u8]))
}

pub struct Http {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Http {
    pub async fn connect(addr: SocketAddr, local: Option<IpAddr>) -> Result<Http> {
        let stream = tcp(addr, local)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body))?;
        self.sender.ready().await?;
        Ok(self.sender.send_request(req).await?)
    }

    /// POSTs JSON and returns the status and the whole body.
    pub async fn post_json(&mut self, path: &str, body: Bytes) -> Result<(StatusCode, Bytes)> {
        let res = self
            .send(
                Method::POST,
                path,
                &[("content-type", "application/json")],
                body,
            )
            .await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Appends and returns the response's `last_seq`; fails on any status but 201.
    pub async fn append(&mut self, stream: &str, body: String) -> Result<u64> {
        let (status, bytes) = self
            .post_json(&format!("/v1/streams/{stream}/events"), body.into())
            .await?;
        if status != StatusCode::CREATED {
            bail!(
                "append to {stream}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        crate::util::u64_after(&bytes, b"\"last_seq\":").context("append response without last_seq")
    }

    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response<Incoming>> {
        self.send(Method::GET, path, headers, Bytes::new()).await
    }
}
