"""The packages tools/mutation.py mutates: a label -> the source files and the tests run against them."""
from __future__ import annotations

# package label -> files. A source file may name functions to restrict the mutants to ("file.py::f,Class.m");
# entries under tests/ (files or pytest node ids) restrict the tests run for that package (default: the whole
# suite), "!tests/..." deselects one. Edit this table when the tree moves.
PACKAGES: dict[str, list[str]] = {
    "sampling": ["sampling/schedule.py", "sampling/latents.py", "sampling/denoise.py", "sampling/step_cache.py",
                 "sampling/gpu_acceleration.py", "sampling/parameters.py", "tests/test_schedule.py",
                 "tests/test_pipeline_parity.py", "tests/test_step_cache.py", "tests/test_sampler_node.py",
                 "tests/test_node_contract.py", "tests/test_denoise_loop.py", "tests/test_parameters.py",
                 "tests/test_inpainting.py", "tests/test_sequence_parallel.py",
                 "!tests/test_step_cache.py::test_compiled_blocks_share_graphs_across_blocks_and_sizes",
                 "!tests/test_step_cache.py::test_compiled_blocks_serve_a_new_model_and_free_the_old_one"],
    "model_loader math": [
        "model_loader/flux/math.py", "model_loader/flux/layers.py", "model_loader/flux/model.py",
        "model_loader/flux/layouts.py", "model_loader/flux/loading.py::_convert,_dequantize,_storage",
        "model_loader/text_encoders/clip.py", "model_loader/text_encoders/t5.py", "model_loader/autoencoder/model.py",
        "model_loader/autoencoder/tiling.py", "model_loader/autoencoder/config.py",
        "model_loader/autoencoder/layouts.py::diffusers_key_names,config_from_checkpoint",
        "model_loader/operations.py", "model_loader/compute_dtypes.py",
        "tests/test_flux_parity.py", "tests/test_flux_loading.py", "tests/test_transformer_contract.py",
        "tests/test_autoencoder.py", "tests/test_text_encoders.py", "tests/test_operations.py",
        "tests/test_flux_math.py", "tests/test_flux_layouts.py", "tests/test_weight_storage.py",
        "tests/test_autoencoder_build.py", "tests/test_vae_tiling.py", "tests/test_text_encoder_loading.py",
        "tests/test_wrong_files.py", "tests/test_attention_seam.py", "tests/test_weights_for_comfyui.py",
        # GGUF names and quantized layers (t5.py, operations.py) and LoRA factors beside them, added since
        "tests/test_gguf_t5.py", "tests/test_gguf_flux.py", "tests/test_gguf_quants.py", "tests/test_gguf_lora.py",
        "tests/test_lora_engine.py"],
    "nodes": ["nodes/handles.py", "nodes/image.py", "nodes/loader.py", "nodes/model_files.py", "nodes/safety.py",
              "nodes/sampler.py", "nodes/text.py",  # and what handles.py held before the host interface took
              # it (the model cache, the ways of holding a model, the standalone MODEL, CLIP and VAE)
              "nodes/host/holding.py", "nodes/host/standalone_models.py",
              # the node-level tests (tests/test_comfyui_host.py runs the pack in processes mutmut does not reach)
              "tests/test_node_contract.py", "tests/test_sampler_node.py", "tests/test_image_nodes.py",
              "tests/test_save_image.py", "tests/test_safety_checker.py", "tests/test_safety_check_node.py",
              "tests/test_end_to_end.py", "tests/test_hostile_input.py", "tests/test_workflow_files.py",
              "tests/test_runner.py", "tests/test_cli_run.py", "tests/test_pipeline_parity.py",
              "tests/test_denoise_loop.py", "tests/test_schedule.py", "tests/test_step_cache.py",
              "tests/test_pack_import.py", "tests/test_wrong_files.py", "tests/test_checkpoints.py",
              "tests/test_node_inputs.py", "tests/test_node_messages.py", "tests/test_model_handles.py",
              "!tests/test_step_cache.py::test_compiled_blocks_share_graphs_across_blocks_and_sizes",
              "!tests/test_step_cache.py::test_compiled_blocks_serve_a_new_model_and_free_the_old_one"],
    "runner": ["standalone/runner.py"],
    "image_io": ["image_io/load.py", "image_io/save.py", "tests/test_image_nodes.py", "tests/test_save_image.py",
                 "tests/test_inpainting.py", "tests/test_hostile_input.py", "tests/test_validate_and_decode_once.py",
                 "tests/test_runner.py", "tests/test_cli_run.py", "tests/test_fal_hostile.py",
                 "tests/test_fal_limits.py", "tests/test_end_to_end.py", "tests/test_load_image.py"],
    "fal_api": ["fal_api/jobs.py", "fal_api/storage.py", "fal_api/size_limit.py", "fal_api/http_limits.py",
                "fal_api/schema.py", "fal_api/fields.py", "fal_api/workflow.py",  # fal's protocol core, and the
                # tests that run it in-process (those starting servers or clients would make each mutant slow)
                "tests/test_fal_second_lines.py", "tests/test_fal_limits.py", "tests/test_fal_records.py",
                "tests/test_fal_retention.py", "tests/test_fal_schema.py", "tests/test_fal_response.py",
                "tests/test_web_fal_mapping.py", "tests/test_workflow_files.py"],
    # the rest of fal_api: routes over an in-process backend, uploads and files, image and LoRA input, the guard
    "fal_api routes": [
        "fal_api/routes.py", "fal_api/file_routes.py", "fal_api/image_input.py", "fal_api/remote_fetch.py",
        "fal_api/records.py", "fal_api/address_guard.py", "fal_api/lora_input.py", "fal_api/lora_nodes.py",
        "fal_api/streaming.py", "fal_api/settings.py", "fal_api/endpoints.py", "fal_api/backend.py",
        "fal_api/tls_key.py",
        "tests/test_fal_address_guard.py", "tests/test_fal_remote_fetch.py", "tests/test_fal_lora_sources.py",
        "tests/test_fal_limits.py", "tests/test_fal_records.py", "tests/test_fal_retention.py",
        "tests/test_fal_response.py", "tests/test_fal_stream_previews.py", "tests/test_fal_second_lines.py",
        "tests/test_fal_schema.py", "tests/test_validate_and_decode_once.py", "tests/test_web_fal_mapping.py",
        "tests/test_workflow_files.py", "tests/test_lora_cli.py", "tests/test_gguf_standalone.py",
        "tests/test_fal_certificates.py", "tests/test_fal_fetch_to_file.py", "tests/test_fal_tls_key_permissions.py",
        "tests/test_fal_input_images.py", "tests/test_fal_lora_base_and_limits.py",
        "tests/test_fal_lora_hugging_face_names.py", "tests/test_fal_environment_settings.py",
        "tests/test_fal_queue_calls.py", "tests/test_fal_accepting.py", "tests/test_fal_file_calls.py",
        "tests/test_fal_lora_workflow.py"],
    # the host interface and its two implementations, in two packages so that each can be rerun alone (mutmut takes
    # hours for both on two cores). ComfyUI's runs on the adapter's stand-ins in-process.
    "nodes/host comfyui": [
        "nodes/host/comfyui_host.py", "nodes/host/comfyui_models.py", "nodes/host/comfyui_errors.py",
        "nodes/host/fal_queue.py",
        "tests/test_comfyui_adapter.py", "tests/test_comfyui_errors.py", "tests/test_fal_in_comfyui_queue.py",
        "tests/test_fal_in_comfyui_routes.py", "tests/test_comfyui_host_calls.py",
        "tests/test_comfyui_gguf_lora_resident.py", "tests/test_comfyui_text_encoders_and_vae.py",
        "tests/test_model_handles.py", "tests/test_safety_check_node.py"],
    "nodes/host standalone": [
        "nodes/host/interface.py", "nodes/host/folders.py", "nodes/host/standalone_host.py",
        "nodes/host/standalone_models.py", "nodes/host/holding.py",
        "tests/test_model_handles.py", "tests/test_safety_check_node.py", "tests/test_lora_cli.py",
        "tests/test_node_messages.py", "tests/test_node_inputs.py", "tests/test_pack_import.py",
        "tests/test_gguf_standalone.py", "tests/test_runner.py", "tests/test_cli_run.py", "tests/test_sampler_node.py",
        "tests/test_image_nodes.py", "tests/test_comfyui_adapter.py", "tests/test_comfyui_host_calls.py",
        "tests/test_standalone_host.py", "tests/test_save_image.py", "tests/test_wrong_files.py",
        "tests/test_checkpoints.py", "tests/test_end_to_end.py", "tests/test_node_contract.py",
        "tests/test_vae_interrupt.py", "tests/test_hostile_input.py"],
    # the command line and the standalone server, in two packages as nodes/host (runner.py is its own package above;
    # the Ray modules run in Ray's worker processes and sequence_parallel_run.py under torchrun, where mutmut's
    # mutants do not reach)
    "standalone commands": [
        "standalone/cli.py", "standalone/demo.py", "standalone/overrides.py", "standalone/preflight.py",
        "standalone/ui_workflow.py", "standalone/node_classes.py", "standalone/terminal.py",
        "tests/test_cli_run.py", "tests/test_cli_terminal.py", "tests/test_ui_workflow.py",
        "tests/test_web_migration.py", "tests/test_runner.py", "tests/test_lora_cli.py",
        "tests/test_gguf_standalone.py", "tests/test_workflow_files.py", "tests/test_end_to_end.py",
        "tests/test_hostile_input.py", "tests/test_run_server_command.py", "tests/test_serve_options.py",
        "tests/test_validate_and_decode_once.py", "tests/test_fal_schema.py", "tests/test_comfyui_errors.py",
        "tests/test_cli_options.py", "tests/test_cli_exits.py", "tests/test_cli_report.py",
        "tests/test_cli_run_setup.py", "tests/test_preflight.py", "tests/test_preflight_loras.py",
        "tests/test_workflow_options.py", "tests/test_demo_models.py", "tests/test_node_classes.py",
        "tests/test_ui_bypass_rules.py", "tests/test_ui_definitions.py"],
    "standalone serve": [
        "standalone/remote.py", "standalone/previews.py", "standalone/runner_backend.py", "standalone/fal_server.py",
        "standalone/serve_commands.py", "standalone/certificates.py",
        "tests/test_runner.py", "tests/test_fal_certificates.py", "tests/test_run_server.py",
        "tests/test_run_server_client.py", "tests/test_run_server_downloads.py", "tests/test_stream_preview_images.py",
        "tests/test_run_server_command.py", "tests/test_serve_options.py", "tests/test_serve_in_process.py",
        "tests/test_serve_runner_queue.py", "tests/test_serve_demo_folders.py", "tests/test_cli_terminal.py",
        "tests/test_validate_and_decode_once.py", "tests/test_cli_options.py"],
}
