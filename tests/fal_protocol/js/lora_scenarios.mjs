// The official fal JavaScript client (@fal-ai/client, pinned in package.json), unchanged, against the LoRA endpoints
// of a server of the pack through its proxy option (every call to <base>/proxy with x-fal-target-url). Prints ONE
// JSON line: scenario -> {ok} or {error}; tests/test_fal_lora_endpoints.py asserts on it.
//
//     node lora_scenarios.mjs BASE_URL FILES_URL
//
// FILES_URL: http://loras.example:<port>, the test's file server (the server reaches it through lora_dns).
// Env: FAL_KEY, NODE_EXTRA_CA_CERTS (the server's CA).
import falClient from "@fal-ai/client";

const { createFalClient, ApiError, ValidationError } = falClient;

const BASE = (process.argv[2] ?? "").replace(/\/+$/, "");
const FILES = process.argv[3];
const fal = createFalClient({ proxyUrl: { url: `${BASE}/proxy`, when: "always" } });
const SMALL = { prompt: "a lighthouse at dusk", seed: 5, output_format: "png", sync_mode: true,
  num_inference_steps: 3, image_size: { width: 64, height: 48 } };
const TWO = [{ path: "style.safetensors", scale: 0.7 }, { path: "sub/detail.safetensors", scale: 0.4 }];
const report = {};

function describeError(err) {
  const out = { name: err?.constructor?.name ?? typeof err, message: String(err?.message ?? err) };
  if (err instanceof ApiError) out.status = err.status;
  if (err instanceof ValidationError) out.fieldErrors = err.fieldErrors;
  return out;
}

async function scenario(name, body) {
  try {
    report[name] = { ok: await body() };
  } catch (err) {
    report[name] = { error: describeError(err) };
  }
}

const summary = (result) => ({ requestId: result.requestId, seed: result.data.seed,
  images: result.data.images.map((i) => ({ width: i.width, height: i.height, url: i.url })) });

await scenario("t2i_none", async () => summary(await fal.run("fal-ai/flux-krea-lora", { input: SMALL })));
await scenario("t2i_two", async () =>
  summary(await fal.run("fal-ai/flux-krea-lora", { input: { ...SMALL, loras: TWO } })));
await scenario("t2i_url", async () => summary(await fal.run("fal-ai/flux-krea-lora", {
  input: { ...SMALL, loras: [{ path: `${FILES}/style.safetensors`, scale: 0.7 }, TWO[1]] } })));
await scenario("i2i", async () => summary(await fal.run("fal-ai/flux-krea-lora/image-to-image", {
  input: { ...SMALL, image_url: process.env.LORA_IMAGE, strength: 0.8, loras: TWO } })));
await scenario("inpainting", async () => summary(await fal.run("fal-ai/flux-krea-lora/inpainting", {
  input: { ...SMALL, image_url: process.env.LORA_IMAGE, mask_url: process.env.LORA_MASK, loras: TWO } })));
await scenario("stream", async () => {
  const stream = await fal.stream("fal-ai/flux-krea-lora/stream",
    { input: { ...SMALL, num_inference_steps: 4, loras: TWO } });
  const events = [];
  for await (const event of stream) events.push(event);
  const done = await stream.done();
  const brief = (e) => ({ keys: Object.keys(e).sort(), url: String(e.images?.[0]?.url ?? "").slice(0, 30) });
  return { events: events.map(brief), done: { ...brief(done), seed: done.seed, url: done.images?.[0]?.url,
    has_nsfw_concepts: done.has_nsfw_concepts }, requestId: stream.requestId };
});
await scenario("hostile_escape", async () => fal.run("fal-ai/flux-krea-lora",
  { input: { ...SMALL, loras: [{ path: "../diffusion_models/flux1-krea-dev.safetensors" }] } }));
await scenario("hostile_huge_url", async () => fal.run("fal-ai/flux-krea-lora",
  { input: { ...SMALL, loras: [{ path: `${FILES}/huge` }] } }));
await scenario("hostile_pickle", async () => fal.run("fal-ai/flux-krea-lora",
  { input: { ...SMALL, loras: [{ path: "pickled.safetensors" }] } }));

console.log(JSON.stringify(report));
