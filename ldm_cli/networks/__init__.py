"""LoRAs and textual-inversion embeddings, as A1111 applies them.

- `tags`: which LoRAs a prompt asks for (`<lora:NAME:W>`, `<lora:NAME:TE_W:UNET_W>`) and the
  `--lora FILE[:W]` flag written as such a tag;
- `lookup`: the folders searched and a name found in them (by file stem, recursively);
- `hashes`: A1111's short hashes of LoRA and embedding files, for the PNG's metadata;
- `formats`: a LoRA file's keys (kohya/A1111, diffusers/PEFT, LyCORIS) read as factors per layer;
- `deltas`: the weight change each kind of factors makes (LoRA, LoCon/Tucker, LoHa, LoKr);
- `targets`: a LoRA layer's name to the loaded modules' weights it changes;
- `merge`: W + scale * delta merged into the model for a run, and restored exactly;
- `embeddings`: textual inversion: the files, and their names found in a prompt's tokens (the
  model's `embeddings`, which families/clip_text.py asks while it chunks a prompt);
- `session`: the LoRAs and embeddings of a loaded model, switched per batch.
"""
