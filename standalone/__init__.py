"""Running without a ComfyUI server: the command line (cli: `run`, `serve`, `make-cert`), what `run` writes into a
workflow (overrides), the UI-format conversion (ui_workflow), the API-workflow runner (runner) and its node classes
(node_classes), the memory pre-flight (preflight), `run --server` on a running ComfyUI (remote), the random-weight
demo models (demo), and the fal protocol's standalone server: its runner backend (runner_backend), the aiohttp app
(fal_server), its options (serve_commands) and local certificates for https (certificates)."""
