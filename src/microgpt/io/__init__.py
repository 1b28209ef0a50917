"""Files in and out: checkpoints (every format microgpt reads), Hugging Face conversion, export, consolidation.

checkpoint.py   read any checkpoint (format probes in one table, one safe torch.load) -> (model, tokenizer)
hf.py           Hugging Face GPT-2 directories and the Hub <-> microgpt weights and config
export.py       write a trained model as safetensors, HF, int8 or GGUF (`python -m microgpt.export`)
consolidate.py  sharded FSDP/DeepSpeed checkpoints -> one file (`python -m microgpt.consolidate`)
"""
