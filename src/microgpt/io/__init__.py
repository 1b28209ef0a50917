"""Files in and out: checkpoints (every format microgpt reads), Hugging Face conversion, export, consolidation.

checkpoint.py   read any checkpoint (format probes in one table, one safe torch.load) -> (model, tokenizer)
hf.py           Hugging Face GPT-2 directories and the Hub <-> microgpt weights and config
export.py       write a trained model as safetensors, HF, int8, GGUF or ONNX (`python -m microgpt.export`)
onnx.py         the ONNX graph (KV cache) format=onnx writes, its onnxruntime check, OnnxGPT that loads it
consolidate.py  sharded FSDP/DeepSpeed checkpoints -> one file (`python -m microgpt.consolidate`)
"""
