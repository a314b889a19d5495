"""BlockLLM worker: the stage engine (`worker.Worker`, no sockets) and its process wrapper.

Engine modules: `items` (value types, `stage_key`; no torch), `errors` (ErrorCode and typed
errors), `blocks` (HF module adapters, block cache), `attention` (paged ragged attention),
`kv_cache` (the paged KV pool), `batch_queue`, `sampling`, `worker`, `bench`. This package
imports nothing on its own, so light users (the broker) pay for torch only when they need it.
"""
