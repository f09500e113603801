"""Running without a ComfyUI server: the command line (cli), the API-workflow runner (runner) and the
random-weight demo models (demo)."""
