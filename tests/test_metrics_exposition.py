"""The exposition: workers' multiprocess files merged by mode, the text parsed back by prometheus-client."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families

from proxy.observability import exposition


def test_two_processes_files_merge_by_mode(tmp_path, monkeypatch):
    from prometheus_client import Counter, Gauge, Histogram, values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.get_value_class())
    low = Gauge("t_low", "h", ["k"], multiprocess_mode="livemin", registry=None)
    high = Gauge("t_high", "h", ["k"], multiprocess_mode="livemax", registry=None)
    total = Gauge("t_open", "h", multiprocess_mode="livesum", registry=None)
    count = Counter("t_requests", "h", ["a"], registry=None)
    latency = Histogram("t_seconds", "h", ["m"], buckets=(0.1, 1.0), registry=None)

    def work(v: float) -> None:
        low.labels("x").set(v)
        high.labels("x").set(v)
        total.inc(v)
        count.labels('quote" and \\ slash').inc(v)
        latency.labels("m").observe(v / 10)

    pid = os.fork()
    if pid == 0:  # a second worker
        work(5)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    work(2)
    text = exposition.render(exposition.run(exposition.MultiprocessReader(str(tmp_path)).collect())).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("t_low", (("k", "x"),))] == 2
    assert samples[("t_high", (("k", "x"),))] == 5
    assert samples[("t_open", ())] == 7
    assert samples[("t_requests_total", (("a", 'quote" and \\ slash'),))] == 7
    assert samples[("t_seconds_bucket", (("le", "0.1"), ("m", "m")))] == 0
    assert samples[("t_seconds_bucket", (("le", "1.0"), ("m", "m")))] == 2
    assert samples[("t_seconds_count", (("m", "m"),))] == 2
    assert abs(samples[("t_seconds_sum", (("m", "m"),))] - 0.7) < 1e-9


def test_one_process_store_renders_what_the_parser_reads():
    store = exposition.Store()
    hist = store.add(exposition.Family("histogram", "x_seconds", "help\nline", ["m"], (0.001, 0.5)))
    counter = store.add(exposition.Family("counter", "x_requests", "h", ["m"]))
    gauge = store.add(exposition.Family("gauge", "x_open", "h"))
    for v in (0.0005, 0.001, 0.2, 7.0):
        hist.labels("a").observe(v)
    counter.labels("a").inc(3)
    gauge.set_function(lambda: 4)
    text = exposition.render(exposition.run(store.collect())).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["x_seconds"].documentation == "help\nline"
    got = {(s.name, s.labels.get("le")): s.value for s in families["x_seconds"].samples}
    assert got == {("x_seconds_bucket", "0.001"): 2, ("x_seconds_bucket", "0.5"): 3,
                   ("x_seconds_bucket", "+Inf"): 4, ("x_seconds_count", None): 4, ("x_seconds_sum", None): 7.2015}
    assert families["x_requests"].type == "counter" and families["x_requests"].samples[0].value == 3
    assert families["x_open"].samples[0].value == 4
    assert exposition.parse_key('x_requests_total{m="a\\"b"}') == ("x_requests_total", {"m": 'a"b'})
