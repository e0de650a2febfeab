// The playground's History sidebar, read from fal's request history API like any fal client could:
// GET /v1/models/requests/by-endpoint with every catalogue endpoint, expand=payloads, the last 30 days, pages
// following next_cursor ("Load older") and fal's status filter. fal's items carry no dialect: an entry is what
// the request sent (json_input) and what it answered (json_output, its error body when it failed).

import { statusBadge } from "./gallery.js";
import { describe, getJSON, h } from "./lib.js";

const PAGE = 30;
const WINDOW_DAYS = 30;
const $ = (id) => document.getElementById(id);
const state = { cursor: null, loads: 0, endpoints: [], open: async () => {} };
const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "medium" });

// The job's state in the words the gallery uses, from fal's fields: status_code once it ended (200 completed,
// 400 cancelled, anything else failed), else queued or running by whether it started.
export function statusOf(item) {
  if (item.status_code === null || item.status_code === undefined) return item.started_at ? "running" : "queued";
  if (item.status_code === 200) return "completed";
  return item.status_code === 400 ? "cancelled" : "failed";
}

const fmtDuration = (s) => (typeof s !== "number" ? "" : s < 60 ? `${s.toFixed(1)} s` : `${Math.round(s / 60)} min`);

function entry(item) {
  const output = item.json_output || {};
  const thumb = output.images?.[0];
  const prompt = item.json_input?.prompt;
  const label = prompt || (item.json_input ? "(no prompt)" : "(input not stored)");
  const status = statusOf(item);
  return h("li", {},
    h("button", { type: "button", class: "history-item", "data-job": item.request_id, "data-status": status,
      onclick: () => state.open(item) },
      thumb ? h("img", { src: thumb.url, alt: "", loading: "lazy", width: 56, height: 56 })
        : h("span", { class: "no-thumb", "aria-hidden": "true" }, "—"),
      h("span", { class: "history-text" },
        h("span", { class: "history-prompt" }, label),
        h("span", { class: "history-meta" },
          statusBadge(status),
          h("span", { class: "endpoint", title: item.endpoint_id }, item.endpoint_id.replace(/^fal-ai\//, ""))),
        h("span", { class: "history-meta" },
          h("time", { datetime: item.sent_at }, item.sent_at ? timeFormat.format(new Date(item.sent_at)) : ""),
          typeof item.duration === "number" && item.duration >= 0
            ? h("span", { class: "duration" }, `· ${fmtDuration(item.duration)}`) : null))));
}

// The first page (older = false) or the next one; a newer first-page load wins over a slower earlier one.
export async function loadHistory(older = false) {
  if (older && !state.cursor) return;
  if (!state.endpoints.length) { $("history-status").textContent = "No endpoints."; return; }
  const load = ++state.loads;
  const start = new Date(Date.now() - WINDOW_DAYS * 86_400_000).toISOString();
  const params = new URLSearchParams({ endpoint_id: state.endpoints.join(","), expand: "payloads", start,
    limit: String(PAGE) });
  const status = $("history-filter").value;
  if (status) params.set("status", status);
  if (older) params.set("cursor", state.cursor);
  const body = await getJSON(`/v1/models/requests/by-endpoint?${params}`);
  if (load !== state.loads) return;
  const list = $("history");
  const entries = body.items.map(entry);
  if (older) list.append(...entries); else list.replaceChildren(...entries);
  state.cursor = body.next_cursor;
  $("history-more").hidden = !body.next_cursor;
  $("history-status").textContent = list.children.length ? ""
    : status ? "No requests with this status in the last 30 days." : "No requests yet.";
}

// endpoints: the catalogue's endpoint ids; open(item): what clicking an entry does (a fal history item).
export function setupHistory(endpoints, open) {
  state.endpoints = endpoints;
  state.open = open;
  $("history-filter").addEventListener("change", () => loadHistory().catch(showFailure));
  $("history-more").addEventListener("click", () => loadHistory(true).catch(showFailure));
}

export function showFailure(error) {
  $("history-status").textContent = error.status === 401 ? "Enter the API key to see the history." : error.message;
}

// What a failed request answered, in words (fal's error body: detail, a string or validation entries).
export const errorText = (item) => describe(item.json_output);
