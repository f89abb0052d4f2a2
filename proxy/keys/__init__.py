"""Virtual keys, rate limits, budgets and spend, on an embedded SQLite store or Redis.

    records.py       a key: secret, hash, id, fields, and the checks of what an admin sends
    store.py         the store's contract and the one admission decision (judge)
    sqlite_store.py  the embedded store: one writer thread per process, BEGIN IMMEDIATE, WAL
    redis_store.py   several instances: the same operations as Lua scripts
    leases.py        allowances taken from the store and spent in memory: most requests never wait on it
    policy.py        auth by hash from memory; admit (403/429/503, lease or reserve) and settle (spend)
    admin.py         /admin/keys and /admin/spend
    cli.py           `llm-gateway keys ...` on the same store, server running or not
"""
