"""The artifact directory (DESIGN.md §4), the format in one folder; import from the module that holds a name:

- writer.py    check_output (what a run may not overwrite), ArtifactWriter (parts in a temporary sibling, one
               rename at the end), join_safetensors, clean_stale.
- manifest.py  compression.json's names and contents: layer_entry, manifest_sizes, the compressed-tensors
               quantization_config, the source record, write_metadata (config.json, tokenizer files,
               recipe.yaml, compression.json and its sidecar).
- reader.py    read_manifest, verify_hashes, check_artifact, load_model / load_compressed, describe (`inspect`),
               recorded_base and verify's transformers row.
"""
