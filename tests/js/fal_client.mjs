// The official @fal-ai/client against fluxserve: every fal URL is rewritten to the server by the `fetch` option.
// usage: node fal_client.mjs http://127.0.0.1:PORT [key]   -> prints REPORT{json}
import { createFalClient, ValidationError } from "@fal-ai/client";

const [server, key] = process.argv.slice(2);
const HOSTS = [
  ["https://queue.fal.run/", `${server}/queue/`],
  ["https://fal.run/", `${server}/run/`],
  ["https://rest.fal.ai/", `${server}/`],
  ["https://v3.fal.media/", `${server}/`],
];
const rewrite = (url) => {
  for (const [from, to] of HOSTS) if (url.startsWith(from)) return to + url.slice(from.length);
  return url;
};
const fal = createFalClient({
  credentials: key || "fluxserve-local",
  fetch: (url, init) => fetch(rewrite(String(url)), init),
});

const small = { image_size: { width: 512, height: 512 } };
const report = {};

const updates = [];
const polled = await fal.subscribe("fal-ai/flux-2/flash", {
  input: { prompt: "polling", seed: 5, ...small },
  logs: true,
  pollInterval: 100,
  onQueueUpdate: (update) => updates.push(update),
});
report.polling = { data: polled.data, requestId: polled.requestId,
  statuses: updates.map((u) => u.status), logs: updates.flatMap((u) => (u.logs || []).map((l) => l.message)) };

const streamed = [];
const viaStream = await fal.subscribe("fal-ai/flux-2/klein/4b", {
  input: { prompt: "streaming", ...small },
  logs: true,
  mode: "streaming",
  onQueueUpdate: (update) => streamed.push(update),
});
report.streaming = { data: viaStream.data, requestId: viaStream.requestId,
  statuses: streamed.map((u) => u.status), logs: streamed.at(-1)?.logs?.map((l) => l.message) || [] };

// a 1x1 PNG (uploads must be images or safetensors files)
const png = Uint8Array.from(atob("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="), (c) => c.charCodeAt(0));
const blob = new Blob([png], { type: "image/png" });
report.upload = await fal.storage.upload(blob);

try {
  await fal.subscribe("fal-ai/flux-2-pro", { input: { prompt: "x", output_format: "webp" } });
  report.invalid = "accepted";
} catch (error) {
  report.invalid = { name: error.name, status: error.status, isValidation: error instanceof ValidationError,
    fields: error.fieldErrors?.map((e) => e.loc) };
}
console.log("REPORT" + JSON.stringify(report));
