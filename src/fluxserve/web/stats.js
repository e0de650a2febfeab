// The stats page: GET /api/stats for a window and a grouping, shown as a headline, three bar charts (inline
// SVG) and the rankings table. The window and grouping live in the address (?window=24h&group_by=endpoint).
import { getJSON, h, HttpError, onUnauthorized } from "/web/lib.js";

const WINDOW_WORDS = { "1h": "hour", "24h": "24 hours", "30d": "30 days" };
const KEY_WORDS = { endpoint: "Endpoint", model: "Model", dialect: "Dialect", provider: "Provider" };
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const controls = $("stats-controls");
let blocked = "";  // a 401's message: shown instead of figures

// ---- formatting ------------------------------------------------------------------------------------------------
const ms = (value) => (value == null ? "–" : `${Math.round(value).toLocaleString("en-US")}ms`);
const percent = (rate) => (rate == null ? "–" : `${(rate * 100).toFixed(1)}%`);

function throughput(perMinute) {
  if (perMinute >= 0.1) return `${perMinute.toFixed(2)}/min`;
  const perHour = perMinute * 60;
  return perHour >= 0.01 ? `${perHour.toFixed(2)}/h` : `${(perHour * 24).toFixed(2)}/day`;
}

// ---- the address -----------------------------------------------------------------------------------------------
function chosen() {
  const params = new URLSearchParams(location.search);
  const period = WINDOW_WORDS[params.get("window")] ? params.get("window") : "24h";
  const groupBy = KEY_WORDS[params.get("group_by")] ? params.get("group_by") : "endpoint";
  return { period, groupBy };
}

function choose(period, groupBy) {
  history.replaceState(null, "", `?window=${period}&group_by=${groupBy}`);
  load();
}

// ---- charts ----------------------------------------------------------------------------------------------------
function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

// One horizontal bar per group under a line with the group's name (left) and its value (right); `back` (p95)
// is drawn lighter behind `value` (p50).
function barChart(title, groups, { value, back, label, max, tone }) {
  const width = 320, row = 36;
  const top = max || Math.max(...groups.map((g) => Math.max(value(g) ?? 0, back ? back(g) ?? 0 : 0)), 1e-9);
  const length = (v) => (v ? Math.max((v / top) * width, 2) : 0);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${groups.length * row}`, role: "img",
    "aria-label": title, class: "bar-chart" });
  groups.forEach((group, i) => {
    const y = i * row;
    chart.append(svg("text", { x: 0, y: y + 11, class: "bar-name" }, group.key || "(none)"));
    chart.append(svg("text", { x: width, y: y + 11, "text-anchor": "end", class: "bar-value" }, label(group)));
    chart.append(svg("rect", { x: 0, y: y + 16, width, height: 10, rx: 3, class: "bar-track" }));
    if (back) chart.append(svg("rect", { x: 0, y: y + 16, width: length(back(group)), height: 10, rx: 3, class: "bar-back" }));
    chart.append(svg("rect", { x: 0, y: y + 16, width: length(value(group)), height: 10, rx: 3,
      class: `bar ${tone ? tone(group) : ""}` }));
  });
  return h("figure", { class: "chart" }, h("figcaption", {}, title), chart);
}

function renderCharts(groups) {
  const charts = $("charts");
  charts.replaceChildren();
  if (!groups.length) return;
  charts.append(
    barChart("Generation Time", groups, {
      value: (g) => g.generation_ms?.p50, back: (g) => g.generation_ms?.p95,
      label: (g) => (g.generation_ms ? `${ms(g.generation_ms.p50)} · p95 ${ms(g.generation_ms.p95)}` : "–"),
    }),
    barChart("Success Rate", groups, {
      value: (g) => g.success_rate, max: 1, label: (g) => percent(g.success_rate),
      tone: (g) => (g.success_rate == null ? "" : g.success_rate >= 0.95 ? "good" : g.success_rate >= 0.8 ? "fair" : "poor"),
    }),
    barChart("Time to First Byte", groups, {
      value: (g) => g.ttfb_ms?.p50, back: (g) => g.ttfb_ms?.p95,
      label: (g) => (g.ttfb_ms ? `${ms(g.ttfb_ms.p50)} · p95 ${ms(g.ttfb_ms.p95)}` : "–"),
    }),
  );
}

// ---- table and headline ----------------------------------------------------------------------------------------
function renderTable(groups, groupBy) {
  $("key-heading").textContent = KEY_WORDS[groupBy];
  $("perf-title").textContent = `${KEY_WORDS[groupBy]} Performance`;
  $("rankings-title").textContent = `${KEY_WORDS[groupBy]} Rankings`;
  const rows = groups.map((g, i) => h("tr", { "data-key": g.key },
    h("td", {}, String(i + 1)),
    h("th", { scope: "row", class: "key" }, g.key || "(none)"),
    h("td", {}, ms(g.generation_ms?.p50)), h("td", {}, ms(g.generation_ms?.p95)),
    h("td", {}, percent(g.success_rate)),
    h("td", {}, ms(g.ttfb_ms?.p50)), h("td", {}, ms(g.ttfb_ms?.p95)),
    h("td", {}, ms(g.queue_wait_ms?.p50)), h("td", {}, ms(g.queue_wait_ms?.p95)),
    h("td", {}, throughput(g.throughput_per_min)),
    h("td", { title: `${g.completed} completed, ${g.failed} failed, ${g.cancelled} cancelled` }, String(g.jobs)),
  ));
  if (!rows.length) {
    rows.push(h("tr", {}, h("td", { colspan: 11, class: "empty" }, "No finished jobs in this window.")));
  }
  $("rankings").tBodies[0].replaceChildren(...rows);
}

function headline(groups, period) {
  const over = `Aggregated from real API requests over the last ${WINDOW_WORDS[period]}.`;
  const fastest = groups.find((g) => g.generation_ms);
  if (!fastest) return ["No finished jobs yet in this window.", over];
  return [`Fastest generation through ${fastest.key} at ${ms(fastest.generation_ms.p50)} median latency with `
    + `${percent(fastest.success_rate)} success rate.`, over];
}

// ---- loading ---------------------------------------------------------------------------------------------------
async function load() {
  const { period, groupBy } = chosen();
  controls.elements.namedItem("window").value = period;
  $("group-by").value = groupBy;
  const table = $("rankings");
  delete table.dataset.window;
  try {
    const body = await getJSON(`/api/stats?window=${period}&group_by=${groupBy}`);
    const [summary, scope] = headline(body.groups, period);
    $("summary").textContent = summary;
    $("summary").removeAttribute("data-tone");
    $("scope").textContent = scope;
    renderCharts(body.groups);
    renderTable(body.groups, groupBy);
  } catch (error) {
    $("summary").textContent = error instanceof HttpError && error.status === 401 ? blocked : `Could not load the stats: ${error.message}`;
    $("summary").dataset.tone = "error";
    $("scope").replaceChildren();
    $("charts").replaceChildren();
    renderTable([], groupBy);
  }
  Object.assign(table.dataset, { window: period, groupBy });
}

onUnauthorized(() => {
  blocked = "This server requires an API key: save one in the playground (API key, top right), then come back.";
});
controls.addEventListener("change", () => choose(controls.elements.namedItem("window").value, $("group-by").value));
$("stats-refresh").addEventListener("click", load);
load();
