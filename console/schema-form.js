// Builds an HTML form from an input request's JSON Schema: one field per property of an
// object schema (string, number, integer, boolean, enum), a raw-JSON textarea for anything
// else. The server validates the answer against the schema again (422 input_invalid); the
// form only gets a person to a valid answer quickly.

let uid = 0;

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (v === true) e.setAttribute(k, "");
    else e.setAttribute(k, String(v));
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

function typeOf(schema) {
  if (!schema || typeof schema !== "object") return null;
  if (Array.isArray(schema.enum) && schema.enum.length) return "enum";
  if (schema.const !== undefined) return "enum";
  let t = schema.type;
  // ["string", "null"] and the like: use the one non-null type.
  if (Array.isArray(t)) {
    const rest = t.filter((x) => x !== "null");
    t = rest.length === 1 ? rest[0] : null;
  }
  return ["string", "number", "integer", "boolean", "object"].includes(t) ? t : null;
}

/**
 * One field for `schema`; returns {element, read()} where read() gives the value,
 * `undefined` for "left empty", or throws Error with a message for the person.
 */
function field(name, schema, required) {
  const id = `f${++uid}`;
  const kind = typeOf(schema);
  const wrap = el("div", { class: `field field-${kind ?? "json"}` });
  const title = schema?.title ?? name ?? "answer";
  const label = el("label", { for: id }, title + (required ? " *" : ""));
  const help = schema?.description ? el("small", { class: "help" }, schema.description) : null;
  let input;
  let read;
  switch (kind) {
    case "enum": {
      const options = schema.enum ?? [schema.const];
      input = el("select", { id, name, required });
      if (!required) input.append(el("option", { value: "" }, "—"));
      options.forEach((v, i) => {
        const o = el("option", { value: String(i) }, typeof v === "string" ? v : JSON.stringify(v));
        if (schema.default !== undefined && JSON.stringify(schema.default) === JSON.stringify(v)) o.selected = true;
        input.append(o);
      });
      read = () => (input.value === "" ? undefined : options[Number(input.value)]);
      break;
    }
    case "boolean": {
      input = el("input", { id, name, type: "checkbox", checked: schema.default === true });
      read = () => input.checked;
      // A checkbox always has a value; put the label after it, the usual reading order.
      wrap.classList.add("field-check");
      wrap.append(input, label);
      if (help) wrap.append(help);
      return { element: wrap, read, name };
    }
    case "number":
    case "integer": {
      input = el("input", {
        id,
        name,
        type: "number",
        required,
        step: kind === "integer" ? "1" : "any",
        min: schema.minimum,
        max: schema.maximum,
        value: typeof schema.default === "number" ? schema.default : undefined,
      });
      read = () => {
        if (input.value.trim() === "") return undefined;
        const n = Number(input.value);
        if (!Number.isFinite(n)) throw new Error(`${title}: not a number`);
        if (kind === "integer" && !Number.isInteger(n)) throw new Error(`${title}: must be a whole number`);
        return n;
      };
      break;
    }
    case "string": {
      const long = (schema.maxLength ?? 0) > 200 || schema.format === "textarea";
      input = el(long ? "textarea" : "input", {
        id,
        name,
        type: long ? undefined : schema.format === "email" ? "email" : "text",
        required,
        minlength: schema.minLength,
        maxlength: schema.maxLength,
        pattern: schema.pattern,
        placeholder: schema.examples?.[0],
      });
      if (typeof schema.default === "string") input.value = schema.default;
      read = () => {
        const v = input.value;
        if (v === "" && !required) return undefined;
        return v;
      };
      break;
    }
    default: {
      // Arrays, nested objects, unions, no schema at all: the person writes JSON.
      input = el("textarea", { id, name, class: "raw-json", rows: 4, required, spellcheck: "false", placeholder: "JSON" });
      if (schema?.default !== undefined) input.value = JSON.stringify(schema.default, null, 2);
      read = () => {
        if (input.value.trim() === "") return undefined;
        try {
          return JSON.parse(input.value);
        } catch (e) {
          throw new Error(`${title}: not valid JSON (${e.message})`);
        }
      };
    }
  }
  wrap.append(label, input);
  if (help) wrap.append(help);
  return { element: wrap, read, name };
}

/**
 * The form for a request's schema. `onSubmit(value)` may return a promise; its rejection's
 * message is shown in the form.
 * @param {object|undefined} schema
 * @param {(value: any) => Promise<void>|void} onSubmit
 */
export function buildForm(schema, onSubmit) {
  const form = el("form", { class: "schema-form", novalidate: true });
  const fields = [];
  let readAll;
  if (typeOf(schema) === "object" && schema.properties && typeof schema.properties === "object") {
    const required = new Set(Array.isArray(schema.required) ? schema.required : []);
    for (const [name, sub] of Object.entries(schema.properties)) {
      const f = field(name, sub, required.has(name));
      fields.push(f);
      form.append(f.element);
    }
    readAll = () => {
      const out = {};
      for (const f of fields) {
        const v = f.read();
        if (v === undefined) {
          if (required.has(f.name)) throw new Error(`${f.name} is required`);
          continue;
        }
        out[f.name] = v;
      }
      return out;
    };
  } else {
    const f = field(null, schema ?? {}, true);
    fields.push(f);
    form.append(f.element);
    readAll = () => {
      const v = f.read();
      if (v === undefined) throw new Error("an answer is required");
      return v;
    };
  }
  const error = el("div", { class: "form-error", role: "alert", hidden: true });
  const submit = el("button", { type: "submit" }, "Send answer");
  form.append(error, submit);
  // A message about an earlier attempt must not linger once the person fixes things.
  form.addEventListener("input", () => {
    error.hidden = true;
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.hidden = true;
    let value;
    try {
      if (!form.checkValidity()) {
        const bad = form.querySelector(":invalid");
        throw new Error(`${bad?.labels?.[0]?.textContent ?? bad?.name ?? "a field"}: ${bad?.validationMessage ?? "invalid"}`);
      }
      value = readAll();
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      return;
    }
    submit.disabled = true;
    try {
      await onSubmit(value);
    } catch (err) {
      error.textContent = err.code ? `${err.code}: ${err.message}` : err.message;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
