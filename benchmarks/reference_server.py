"""The deployment guide's reference service (section 4.1), kept as written: FastAPI, one
`model.generate` per request inside an `async def` endpoint. Only what a fair comparison needs
is parameterised, from the environment: the model folder, dtype, threads, and a fixed number of
new tokens (min = max, so both sides produce exactly as many tokens) instead of max_length=50.

    REF_MODEL=path REF_DTYPE=float32 REF_THREADS=2 REF_TOKENS=32 \
        uvicorn --app-dir benchmarks reference_server:app --port 8001
"""

import os

import torch
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
TOKENS = int(os.environ.get("REF_TOKENS", "32"))

app = FastAPI()
model = AutoModelForCausalLM.from_pretrained(
    os.environ["REF_MODEL"], dtype=getattr(torch, os.environ.get("REF_DTYPE", "float32"))
)
tokenizer = AutoTokenizer.from_pretrained(os.environ["REF_MODEL"])


@app.post("/generate")
async def generate(prompt: str):
    inputs = tokenizer(prompt, return_tensors="pt")
    outputs = model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    return tokenizer.decode(outputs[0])
