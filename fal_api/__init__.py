"""fal's protocol served from the pack: the official fal clients, unchanged, run FLUX.1 Krea on this machine.

`schema` (request bodies, validated as fal's FastAPI service does), `workflow` (a request -> the shipped API workflow
and its outputs -> fal's response), `jobs` (the request records and their status JSON), `storage` (uploads and
served files), `image_input` (image_url -> an image file), `remote_fetch` (other hosts, never private addresses),
`routes` (the HTTP endpoints, direct and behind the JS client's proxy), `runner_backend` (one job at a time on the
in-process runner) and `server` (`python -m comfyui_krea serve`). Inside ComfyUI, nodes/host/fal_queue.py feeds
ComfyUI's own queue with the same routes under /fal.
"""
