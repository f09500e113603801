"""fal's protocol, served from the pack: the official fal clients, unchanged, run FLUX.1 Krea on this machine.

A protocol library that knows no host: `endpoints` (the table of fal endpoints served: schema, workflow, image
fields), `schema` (request bodies, validated as fal's FastAPI service does), `fields` (fal's fields <-> the node
inputs of the workflows), `workflow` (a request -> its workflow; the workflow's outputs -> fal's response), `jobs`
(request records and their status JSON), `records` (ended records on disk, for restarts), `storage` (uploads and
served files), `image_input` (image_url, mask_url -> a checked, decoded image), `size_limit` (the megapixel cap),
`lora_input` (loras -> names in the loras folder: file names, URLs and Hugging Face names into a content-addressed
cache), `streaming` (a streaming endpoint's server-sent events), `address_guard` and `remote_fetch` (other hosts,
never private addresses), `http_limits` (Host, body type, size and
deadline), `tls_key` (a private key others can read), `settings` (defaults both servers share), `backend` (the
interface of what runs the workflows) and `routes` with `file_routes` (the HTTP endpoints, direct and behind the JS
client's proxy). The backends live with their hosts: standalone/runner_backend.py for
`python -m comfyui_krea serve`, nodes/host/fal_queue.py for ComfyUI's own queue under /fal.
"""
