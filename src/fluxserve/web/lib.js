// Shared by the playground's modules: a small DOM helper and HTTP with the saved API key (fetch, JSON,
// server-sent events read through fetch so the Authorization header goes along).

// ---- small DOM helper -----------------------------------------------------------------------------------------
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// ---- HTTP -----------------------------------------------------------------------------------------------------
export class HttpError extends Error {
  constructor(status, body) {
    super(describe(body) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export function describe(body) {
  if (!body) return "";
  if (typeof body === "string") return body;
  const detail = body.detail ?? body.error?.message ?? body.error;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  return JSON.stringify(body);
}

export const KEY_STORAGE = "fluxserve.key";
let unauthorized = () => {};
// What to do when the server answers 401 (the page opens its key panel): fn(message).
export function onUnauthorized(fn) { unauthorized = fn; }

export function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Key ${key}` } : {};
}

export async function api(url, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401) {
    const body = await response.json().catch(() => null);
    unauthorized(localStorage.getItem(KEY_STORAGE)
      ? `The saved key was refused: ${describe(body) || "invalid API key"}. Enter a valid key.`
      : "This server requires an API key. Enter one to continue.");
    throw new HttpError(401, body);
  }
  if (!response.ok && !(response.status === 202)) {
    const text = await response.text();
    let body = text;
    try { body = JSON.parse(text); } catch { /* not JSON */ }
    throw new HttpError(response.status, body);
  }
  return response;
}

export const getJSON = async (url, options) => (await api(url, options)).json();

// Server-sent events over fetch (EventSource cannot send an Authorization header).
export async function* sse(url, signal) {
  const response = await api(url, { signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield JSON.parse(data.join("\n"));
    }
  }
}
