"""The response cache: exact-match, write-through on success, and served when providers fail.

Modules: `key` (what an entry is called, and whether a request uses the cache), `entry` (an
answer as stored, and its replay as a stream or a whole completion), `stores` (memory, SQLite,
Redis), `policy` (the per-request policy that ties them to the gateway: proxy/server/exchange.py).
"""
