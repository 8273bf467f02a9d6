"""The decode-step regression baseline (`make bench-regress`) is made from several runs."""


def test_a_regression_baseline_keeps_each_benchmarks_slowest_minimum():
    from experiments.regress import slowest_minima

    def run(minima: dict) -> dict:
        return {"machine_info": {"node": "x"}, "benchmarks": [
            {"fullname": name, "stats": {"min": m, "median": 2 * m}} for name, m in minima.items()]}

    runs = [run({"ar-1": 1.0, "ar-8": 1.5}), run({"ar-1": 1.2, "ar-8": 2.5}), run({"ar-1": 0.9, "ar-8": 1.6})]
    merged = slowest_minima(runs)
    assert merged["machine_info"] == {"node": "x"}
    assert [(b["fullname"], b["stats"]) for b in merged["benchmarks"]] == [
        ("ar-1", {"min": 1.2, "median": 2.4}), ("ar-8", {"min": 2.5, "median": 5.0})]
    assert slowest_minima(runs[:1]) == runs[0]
