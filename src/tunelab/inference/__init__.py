"""Everything after training: a run folder (outputs.py reads it) put to use.

    inference/generate.py         load a run (adapter or full model, GGUF too) and generate: `tunelab generate`
    inference/chat.py             a streamed terminal conversation: `tunelab chat`
    inference/serve.py            an OpenAI-compatible HTTP API: `tunelab serve`; the app and its routes are
                                  inference/openai_api.py, the request checks inference/openai_requests.py,
                                  the streamed generation inference/streaming.py
    inference/score.py            score texts with a reward model: `tunelab score`
    inference/predict.py          label texts with a text classifier: `tunelab predict`
    inference/evaluate.py         loss, perplexity and samples beside the base: `tunelab evaluate`
    inference/merge.py            a LoRA adapter merged into its base: `tunelab merge`
    inference/export.py           one GGUF file for llama.cpp / Ollama, merging first: `tunelab export`
    inference/device.py           where every loader above puts its model: the CUDA GPU when there is one

Each is callable from Python with the same arguments as its command; the CLI only parses and prints.
"""
