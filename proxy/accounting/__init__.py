"""Accounting: tokens before the call, money after it.

    model_info.py  what is known of an upstream model (shipped table + [model_info] in config)
    tokens.py      prompt tokens with tiktoken, OpenAI's counting rules (worker thread when large)
    images.py      image input tokens, OpenAI's tile rule
    context.py     the context-window check and the sliding-window trim
    prices.py      cost of a usage, worst case of a request
    relayed.py     what a cut stream relayed, for billing it
    policy.py      the per-request policy (order 15) that ties them together
"""
