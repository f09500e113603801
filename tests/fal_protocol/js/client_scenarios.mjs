// The official fal JavaScript client (@fal-ai/client, pinned in package.json), unchanged, against a server of the
// pack through the client's own proxy option: every fal call goes to <base>/proxy with the fal URL it meant in
// the `x-fal-target-url` header. Prints ONE JSON line:
// scenario -> {ok, ms, requests} or {error, ms, requests}; tests/test_fal_js_client.py asserts on it.
//
//     node client_scenarios.mjs BASE_URL [PNG_PATH]
//
// BASE_URL: https://HOST:PORT[/prefix] (the prefix of the fal routes, "/fal" inside ComfyUI). PNG_PATH: an image
// for the upload scenario. Env: FAL_KEY (the client reads it itself), NODE_EXTRA_CA_CERTS (the server's CA).
import { readFileSync } from "node:fs";

import falClient from "@fal-ai/client";

const { createFalClient, ApiError, ValidationError } = falClient;

const BASE = (process.argv[2] ?? "").replace(/\/+$/, "");
const PNG_PATH = process.argv[3];
if (!BASE) {
  console.error("usage: node client_scenarios.mjs BASE_URL [PNG_PATH]");
  process.exit(2);
}
const PROXY = `${BASE}/proxy`;
const T2I = "fal-ai/flux/krea";
const I2I = "fal-ai/flux/krea/image-to-image";
const SMALL = { image_size: { width: 64, height: 48 }, num_inference_steps: 2 };
const LONG = { image_size: { width: 512, height: 512 }, num_inference_steps: 50 };
const STEPPED = { image_size: { width: 128, height: 128 }, num_inference_steps: 40 }; // ~0.3 s of steps: polls see them

// What went over the wire in the current scenario. The recorder is the config's `fetch` and hands every call to
// the global fetch as it came: it only notes the method, URL, proxy target and the answer's status.
let requests = [];

function header(headers, name) {
  if (!headers) return undefined;
  if (headers instanceof Headers) return headers.get(name) ?? undefined;
  const key = Object.keys(headers).find((k) => k.toLowerCase() === name);
  return key === undefined ? undefined : headers[key];
}

function shortUrl(url) {
  const text = String(url);
  return text.startsWith(BASE) ? `<base>${text.slice(BASE.length)}` : text;
}

async function recordingFetch(input, init) {
  const entry = {
    method: init?.method ?? "GET",
    url: shortUrl(input instanceof Request ? input.url : input),
    target: header(init?.headers, "x-fal-target-url"),
  };
  requests.push(entry);
  try {
    const response = await fetch(input, init);
    entry.status = response.status;
    return response;
  } catch (err) {
    entry.failed = `${err.name}: ${err.message}${err.cause ? ` (${err.cause.code ?? err.cause.message})` : ""}`;
    throw err;
  }
}

function makeClient(extra = {}) {
  return createFalClient({ proxyUrl: { url: PROXY, when: "always" }, fetch: recordingFetch, ...extra });
}

const fal = makeClient(); // credentials: the client's default, FAL_KEY from the environment
const report = {};

function describeError(err) {
  const out = { name: err?.constructor?.name ?? typeof err, message: String(err?.message ?? err) };
  if (err instanceof ApiError) {
    out.status = err.status;
    out.body = err.body ?? null;
    out.requestId = err.requestId;
  }
  if (err instanceof ValidationError) out.fieldErrors = err.fieldErrors;
  if (err?.cause) out.cause = String(err.cause?.code ?? err.cause?.message ?? err.cause);
  if (!(err instanceof ApiError)) out.stack = String(err?.stack ?? "").slice(0, 1500);
  return out;
}

async function scenario(name, body) {
  requests = [];
  const started = performance.now();
  try {
    const ok = await body();
    report[name] = { ok };
  } catch (err) {
    report[name] = { error: describeError(err) };
  }
  report[name].ms = Math.round(performance.now() - started);
  report[name].requests = requests;
}

async function caught(promise) {
  try {
    return { returned: await promise };
  } catch (err) {
    return { error: describeError(err) };
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function imageSummary(image) {
  const url = String(image.url);
  return {
    width: image.width,
    height: image.height,
    content_type: image.content_type,
    url_prefix: url.split(",", 1)[0],
    url: url.length <= 200_000 ? url : undefined, // small data URIs: the test decodes them
  };
}

function queueUpdateRecorder() {
  const updates = [];
  const onQueueUpdate = (update) => {
    updates.push({
      status: update.status,
      queue_position: update.queue_position,
      logs: Array.isArray(update.logs) ? update.logs.map((entry) => entry.message) : update.logs ?? null,
    });
  };
  return { updates, onQueueUpdate };
}

async function statusUntilCompleted(endpoint, requestId, logs = true) {
  const seen = [];
  for (let i = 0; i < 3000; i++) {
    const status = await fal.queue.status(endpoint, { requestId, logs });
    seen.push(status.status);
    if (status.status === "COMPLETED") return { seen, last: status };
    await sleep(100);
  }
  throw new Error(`request ${requestId} did not complete; statuses seen: ${seen.slice(-5).join(", ")}`);
}

await scenario("run_sync", async () => {
  const result = await fal.run(T2I, { input: { prompt: "x", ...SMALL, sync_mode: true } });
  return {
    requestId: result.requestId,
    images: result.data.images.map(imageSummary),
    seed: result.data.seed,
    prompt: result.data.prompt,
    has_nsfw_concepts: result.data.has_nsfw_concepts,
  };
});

await scenario("subscribe_polling", async () => {
  const { updates, onQueueUpdate } = queueUpdateRecorder();
  const enqueued = [];
  const result = await fal.subscribe(T2I, {
    input: { prompt: "x", ...STEPPED },
    logs: true,
    mode: "polling",
    pollInterval: 100,
    onEnqueue: (requestId) => enqueued.push(requestId),
    onQueueUpdate,
  });
  const image = result.data.images[0];
  const served = await fetch(image.url); // a result file URL (no sync_mode), served by the same server
  return { enqueued, updates, requestId: result.requestId, images: result.data.images.length,
           first_image: { ...imageSummary(image), url: shortUrl(image.url) },
           fetched: { status: served.status, content_type: served.headers.get("content-type"),
                      size: (await served.arrayBuffer()).byteLength } };
});

await scenario("subscribe_streaming", async () => {
  const { updates, onQueueUpdate } = queueUpdateRecorder();
  const enqueued = [];
  const result = await fal.subscribe(T2I, {
    input: { prompt: "x", ...STEPPED },
    logs: true,
    mode: "streaming",
    onEnqueue: (requestId) => enqueued.push(requestId),
    onQueueUpdate,
  });
  return { enqueued, updates, requestId: result.requestId, images: result.data.images.length };
});

await scenario("queue_submit_status_result", async () => {
  const submitted = await fal.queue.submit(T2I, { input: { prompt: "x", ...SMALL, seed: 11 } });
  const requestId = submitted.request_id;
  const { seen, last } = await statusUntilCompleted(T2I, requestId);
  const result = await fal.queue.result(T2I, { requestId });
  const byImageToImageId = await fal.queue.status(I2I, { requestId }); // the sub-path is dropped by id
  return {
    submitted: { status: submitted.status, request_id: submitted.request_id },
    statuses: seen,
    completed: { metrics: last.metrics, logs: (last.logs ?? []).map((entry) => entry.message), error: last.error },
    result: { requestId: result.requestId, seed: result.data.seed, images: result.data.images.map((i) => ({
      width: i.width, height: i.height, content_type: i.content_type, url_prefix: String(i.url).slice(0, 8) })) },
    by_image_to_image_id: byImageToImageId.status,
  };
});

await scenario("validation", async () => fal.run(T2I, { input: {} }));

await scenario("wrong_key", async () => {
  const wrong = makeClient({ credentials: "wrong" });
  return wrong.run(T2I, { input: { prompt: "x", ...SMALL, sync_mode: true } });
});

await scenario("storage_upload", async () => {
  if (!PNG_PATH) throw new Error("no PNG_PATH argument");
  const bytes = readFileSync(PNG_PATH);
  const url = await fal.storage.upload(new Blob([bytes], { type: "image/png" }));
  const served = await fetch(url);
  const servedBytes = Buffer.from(await served.arrayBuffer());
  const result = await fal.run(I2I, {
    input: { prompt: "x", image_url: url, num_inference_steps: 2, strength: 0.5, sync_mode: true },
  });
  return {
    url: shortUrl(url),
    fetched: { status: served.status, content_type: served.headers.get("content-type"),
               same_bytes: Buffer.compare(servedBytes, bytes) === 0, size: servedBytes.length },
    result: result.data.images.map(imageSummary),
  };
});

await scenario("cancel_queued", async () => {
  const long = await fal.queue.submit(T2I, { input: { prompt: "long", ...LONG } });
  let longDone = false;
  try {
    const waitRunning = async () => {
      for (let i = 0; i < 1200; i++) {
        if ((await fal.queue.status(T2I, { requestId: long.request_id })).status === "IN_PROGRESS") return;
        await sleep(50);
      }
    };
    await waitRunning(); // so the short one is the only one waiting: position 0
    const short = await fal.queue.submit(T2I, { input: { prompt: "waits", ...SMALL } });
    const before = await fal.queue.status(T2I, { requestId: short.request_id });
    const cancel = await caught(fal.queue.cancel(T2I, { requestId: short.request_id }));
    const after = await fal.queue.status(T2I, { requestId: short.request_id, logs: true });
    const shortResult = await caught(fal.queue.result(T2I, { requestId: short.request_id }));
    const cancelAgain = await caught(fal.queue.cancel(T2I, { requestId: short.request_id }));

    await waitRunning();
    await sleep(300);
    const stopAsked = performance.now();
    const cancelRunning = await caught(fal.queue.cancel(T2I, { requestId: long.request_id }));
    const { last } = await statusUntilCompleted(T2I, long.request_id, false);
    longDone = true;
    const stoppedMs = Math.round(performance.now() - stopAsked);
    const longResult = await caught(fal.queue.result(T2I, { requestId: long.request_id }));
    return {
      queued: { status: before.status, queue_position: before.queue_position },
      cancel: cancel.error ?? "accepted",
      after_cancel: { status: after.status, error: after.error, error_type: after.error_type },
      queued_result: shortResult.error ?? "returned",
      cancel_again: cancelAgain.error ?? "accepted",
      running_cancel: cancelRunning.error ?? "accepted",
      running: { status: last.status, error: last.error, error_type: last.error_type, stopped_ms: stoppedMs },
      running_result: longResult.error ?? "returned",
    };
  } finally {
    if (!longDone) await caught(fal.queue.cancel(T2I, { requestId: long.request_id }));
  }
});

process.stdout.write(`${JSON.stringify(report)}\n`);
