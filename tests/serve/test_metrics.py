"""``GET /metrics`` text (``tansuo.serve.metrics``): counters, histograms, labels and their escaping, in the
Prometheus text exposition format 0.0.4, written without a client library."""

from __future__ import annotations

import math
import re
import threading

import pytest

from tansuo.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics

#: one sample line: name, optional {labels}, value (no timestamp)
SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)\})?'
    r" (?P<value>\S+)$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text: str) -> dict[str, dict]:
    """A strict reader of the format: {family: {"type", "help", "samples": [(name, labels, value)]}}.

    Fails on any line that is not HELP, TYPE or a well-formed sample of the family declared last."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, help_ = line[len("# HELP ") :].split(" ", 1)
            assert name not in families, f"{name} declared twice"
            current = families[name] = {"help": help_, "type": None, "samples": []}
            continue
        if line.startswith("# TYPE "):
            name, kind = line[len("# TYPE ") :].split(" ")
            assert current is families.get(name) and current["type"] is None and not current["samples"], line
            assert kind in ("counter", "histogram", "gauge", "summary", "untyped"), line
            current["type"] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        assert current is not None and current["type"] is not None, f"sample before HELP/TYPE: {line!r}"
        family = next(n for n, f in families.items() if f is current)
        suffixes = ("_bucket", "_sum", "_count") if current["type"] == "histogram" else ("",)
        assert m["name"] in {family + s for s in suffixes}, line
        labels = {k: _unescape(v) for k, v in LABEL.findall(m["labels"] or "")}
        current["samples"].append((m["name"], labels, float(m["value"])))
    return families


def _samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


# ------------------------------------------------------------------------------------------------ counters


def test_counter_without_labels() -> None:
    m = Metrics()
    m.counter("things_total", "Things done.")
    m.inc("things_total")
    m.inc("things_total", 2)
    text = m.render()
    assert text == "# HELP things_total Things done.\n# TYPE things_total counter\nthings_total 3\n"
    m.inc("things_total", 0.5)
    assert _samples(m.render()) == ["things_total 3.5"]
    assert m.value("things_total") == 3.5


def test_counter_with_labels_one_line_per_label_set_sorted() -> None:
    m = Metrics()
    m.counter("requests_total", "Requests.")
    m.inc("requests_total", status="200", endpoint="/b")
    m.inc("requests_total", endpoint="/a", status="500")
    m.inc("requests_total", endpoint="/a", status="200")
    m.inc("requests_total", endpoint="/a", status="200")
    assert _samples(m.render()) == [
        'requests_total{endpoint="/a",status="200"} 2',
        'requests_total{endpoint="/a",status="500"} 1',
        'requests_total{endpoint="/b",status="200"} 1',
    ]
    assert m.value("requests_total", status="200", endpoint="/a") == 2  # keyword order does not matter
    assert m.value("requests_total", endpoint="/c", status="200") == 0
    families = parse(m.render())
    assert families["requests_total"]["type"] == "counter"
    assert families["requests_total"]["help"] == "Requests."


def test_a_declared_series_without_values_has_only_its_help_and_type() -> None:
    m = Metrics()
    m.counter("a_total", "A.")
    m.histogram("b_seconds", "B.", (0.1, 1.0))
    assert (
        m.render()
        == "# HELP a_total A.\n# TYPE a_total counter\n# HELP b_seconds B.\n# TYPE b_seconds histogram\n"
    )
    assert m.value("a_total") == 0 and m.value("b_seconds") == 0


def test_series_come_in_declaration_order_each_after_its_help_and_type() -> None:
    m = Metrics()
    m.counter("z_total", "Z.")
    m.histogram("y_seconds", "Y.", (1.0,))
    m.counter("x_total", "X.")
    for name in ("x_total", "z_total"):
        m.inc(name)
    m.observe("y_seconds", 0.5)
    assert list(parse(m.render())) == ["z_total", "y_seconds", "x_total"]


def test_values_are_written_as_integers_when_whole() -> None:
    m = Metrics()
    m.counter("n_total", "N.")
    m.inc("n_total", 1e6, kind="big")
    m.inc("n_total", 0.25, kind="small")
    assert _samples(m.render()) == ['n_total{kind="big"} 1000000', 'n_total{kind="small"} 0.25']


# ------------------------------------------------------------------------------------------------ histograms


def test_histogram_buckets_are_cumulative_up_to_inf_with_sum_and_count() -> None:
    m = Metrics()
    m.histogram("latency_seconds", "Latency.", (1.0, 0.1, 0.5))  # given unsorted
    for v in (0.05, 0.1, 0.3, 0.3, 2.0):  # 0.1 is on a bound: le is inclusive
        m.observe("latency_seconds", v)
    assert _samples(m.render()) == [
        'latency_seconds_bucket{le="0.1"} 2',
        'latency_seconds_bucket{le="0.5"} 4',
        'latency_seconds_bucket{le="1"} 4',
        'latency_seconds_bucket{le="+Inf"} 5',
        f"latency_seconds_sum {0.05 + 0.1 + 0.3 + 0.3 + 2.0!r}",
        "latency_seconds_count 5",
    ]
    assert m.value("latency_seconds") == 5


def test_histogram_with_labels_puts_le_last_per_label_set() -> None:
    m = Metrics()
    m.histogram("batch_size", "Items per call.", BATCH_BUCKETS)
    for n in (1, 3, 3, 200):
        m.observe("batch_size", n, endpoint="/v1/predict")
    m.observe("batch_size", 1000, endpoint="/v1/generate")
    families = parse(m.render())
    samples = families["batch_size"]["samples"]
    by_endpoint: dict[str, list] = {}
    for name, labels, value in samples:
        by_endpoint.setdefault(labels["endpoint"], []).append((name, labels.get("le"), value))
    predict = by_endpoint["/v1/predict"]
    buckets = [(le, v) for name, le, v in predict if name == "batch_size_bucket"]
    assert [le for le, _ in buckets] == [str(b) for b in BATCH_BUCKETS] + ["+Inf"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative
    assert dict(buckets) == {
        "1": 1,
        "2": 1,
        "4": 3,
        "8": 3,
        "16": 3,
        "32": 3,
        "64": 3,
        "128": 3,
        "256": 4,
        "+Inf": 4,
    }
    assert ("batch_size_sum", None, 207.0) in predict and ("batch_size_count", None, 4.0) in predict
    generate = {le: v for name, le, v in by_endpoint["/v1/generate"] if name == "batch_size_bucket"}
    assert generate["256"] == 0 and generate["+Inf"] == 1
    assert m.value("batch_size", endpoint="/v1/predict") == 4
    assert 'batch_size_bucket{endpoint="/v1/predict",le="+Inf"} 4' in m.render()


def test_latency_buckets_render_as_plain_decimals() -> None:
    m = Metrics()
    m.histogram("d_seconds", "D.", LATENCY_BUCKETS)
    m.observe("d_seconds", 0.003)
    les = [labels["le"] for _, labels, _ in parse(m.render())["d_seconds"]["samples"] if "le" in labels]
    assert les[:3] == ["0.001", "0.0025", "0.005"] and les[-1] == "+Inf"
    assert [float(le) for le in les[:-1]] == list(LATENCY_BUCKETS)


# ------------------------------------------------------------------------------------------------ labels


def test_label_values_escape_quotes_backslashes_and_newlines() -> None:
    m = Metrics()
    m.counter("odd_total", "Odd labels.")
    m.histogram("odd_seconds", "Odd labels.", (1.0,))
    value = 'say "hi"\\ then\nbye'
    m.inc("odd_total", path=value)
    m.observe("odd_seconds", 0.5, path=value)
    text = m.render()
    assert 'odd_total{path="say \\"hi\\"\\\\ then\\nbye"} 1\n' in text
    assert 'odd_seconds_bucket{path="say \\"hi\\"\\\\ then\\nbye",le="1"} 1\n' in text
    families = parse(text)  # still one line per sample
    assert families["odd_total"]["samples"] == [("odd_total", {"path": value}, 1.0)]
    assert all(labels["path"] == value for _, labels, _ in families["odd_seconds"]["samples"])


# ------------------------------------------------------------------------------------------------ threads


def test_concurrent_updates_are_all_counted() -> None:
    m = Metrics()
    m.counter("c_total", "C.")
    m.histogram("h_seconds", "H.", (0.5,))

    def work() -> None:
        for _ in range(2000):
            m.inc("c_total", route="/x")
            m.observe("h_seconds", 0.25)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.value("c_total", route="/x") == 8000
    samples = {
        name + labels.get("le", ""): v for name, labels, v in parse(m.render())["h_seconds"]["samples"]
    }
    assert samples == {
        "h_seconds_bucket0.5": 8000,
        "h_seconds_bucket+Inf": 8000,
        "h_seconds_sum": 2000.0,
        "h_seconds_count": 8000,
    }


# ---------------------------------------------------------------------------------------------- a real parser


def test_the_text_parses_with_prometheus_client() -> None:
    parser = pytest.importorskip(
        "prometheus_client.parser",
        reason="prometheus_client is not installed (pip install prometheus-client)",
    )
    m = Metrics()
    m.counter("tansuo_requests_total", "HTTP requests answered, by route and status.")
    m.histogram(
        "tansuo_request_duration_seconds", "Time from request to the end of the answer.", LATENCY_BUCKETS
    )
    m.counter("tansuo_generated_tokens_total", "Tokens generated.")
    m.inc("tansuo_requests_total", endpoint="/v1/predict", status="200")
    m.inc("tansuo_requests_total", endpoint='a "q"\\\n', status="404")
    m.inc("tansuo_generated_tokens_total", 42)
    for v in (0.002, 0.02, 40.0):
        m.observe("tansuo_request_duration_seconds", v, endpoint="/v1/predict")
    families = list(parser.text_string_to_metric_families(m.render()))
    types = {f.name: f.type for f in families}
    # the client names a counter family without its _total (its samples keep it)
    assert types == {
        "tansuo_requests": "counter",
        "tansuo_request_duration_seconds": "histogram",
        "tansuo_generated_tokens": "counter",
    }
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("tansuo_requests_total", (("endpoint", 'a "q"\\\n'), ("status", "404")))] == 1
    assert samples[("tansuo_generated_tokens_total", ())] == 42
    inf = ("tansuo_request_duration_seconds_bucket", (("endpoint", "/v1/predict"), ("le", "+Inf")))
    assert samples[inf] == 3
    assert math.isclose(
        samples[("tansuo_request_duration_seconds_sum", (("endpoint", "/v1/predict"),))], 40.022
    )


def test_help_text_escapes_backslashes_and_newlines() -> None:
    m = Metrics()
    m.counter("tansuo_odd_total", "first line\nsecond \\ line")
    help_lines = [line for line in m.render().splitlines() if line.startswith("# HELP")]
    assert help_lines == ["# HELP tansuo_odd_total first line\\nsecond \\\\ line"]
