// The official fal JavaScript client (@fal-ai/client, pinned in package.json), unchanged, sending many mixed
// requests at once to `serve --ray` through its proxy option (tests/test_fal_ray.py). Prints ONE JSON line: per
// request its kind and the sizes the client was given, or the error it raised.
//
//     node ray_requests.mjs BASE_URL COUNT PNG_PATH
//
// Env: FAL_KEY (the client reads it), NODE_EXTRA_CA_CERTS (the server's CA).
import { readFileSync } from "node:fs";

import falClient from "@fal-ai/client";

const { createFalClient } = falClient;
const [BASE, COUNT, PNG_PATH] = [process.argv[2].replace(/\/+$/, ""), Number(process.argv[3]), process.argv[4]];
const T2I = "fal-ai/flux/krea";
const I2I = "fal-ai/flux/krea/image-to-image";
const fal = createFalClient({ proxyUrl: { url: `${BASE}/proxy`, when: "always" } });

async function one(index) {
  const kind = ["run", "queue", "subscribe_polling", "subscribe_streaming", "image_to_image"][index % 5];
  const size = { width: 64 + 16 * (index % 3), height: 48 };
  const input = { prompt: `js request ${index}`, image_size: size, num_inference_steps: 2 + (index % 3),
                  seed: 1000 + index, num_images: 1 + (index % 2), sync_mode: index % 4 === 0 };
  try {
    let result;
    if (kind === "run") {
      result = await fal.run(T2I, { input });
    } else if (kind === "queue") {
      const { request_id: requestId } = await fal.queue.submit(T2I, { input });
      let status;
      do {
        await new Promise((resolve) => setTimeout(resolve, 200));
        status = await fal.queue.status(T2I, { requestId });
      } while (status.status !== "COMPLETED");
      result = await fal.queue.result(T2I, { requestId });
    } else if (kind.startsWith("subscribe")) {
      result = await fal.subscribe(T2I, { input, mode: kind === "subscribe_streaming" ? "streaming" : "polling" });
    } else {
      const blob = new Blob([readFileSync(PNG_PATH)], { type: "image/png" });
      const url = await fal.storage.upload(blob);
      const { image_size: _, ...rest } = input;
      result = await fal.run(I2I, { input: { ...rest, image_url: url, strength: 0.8 } });
      size.width = 80;
    }
    const images = result.data.images.map((image) => [image.width, image.height]);
    return { index, kind, seed: result.data.seed, sizes: images,
             expected: Array(input.num_images).fill([size.width, size.height]) };
  } catch (err) {
    return { index, kind, error: `${err?.constructor?.name}: ${err?.message} ${JSON.stringify(err?.body ?? null)}` };
  }
}

const pending = [];
const report = [];
for (let index = 0; index < COUNT; index++) {
  pending.push(one(index).then((entry) => report.push(entry)));
  if (pending.length % 6 === 0) await Promise.all(pending.splice(0)); // at most 6 at once, like the Python side
}
await Promise.all(pending);
process.stdout.write(`${JSON.stringify(report)}\n`);
