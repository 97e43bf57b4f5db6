"""deploy/grafana-dashboard.json only queries metrics metald exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from metald.observability.metrics import PER_VM, Metrics
from tests.support.server import make_settings

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"


def exported_names(tmp_path: Path) -> set[str]:
    metrics = Metrics(make_settings(tmp_path, metrics_per_vm_labels=True))
    names = {"vm_instances", "metald_ip_pool_size", "metald_ip_pool_free"} | {name for name, _, _ in PER_VM}
    for family in metrics.registry.collect():
        names |= {family.name} | {sample.name for sample in family.samples}
    for metric in (metrics.operations, metrics.failures, metrics.vmm_exits, metrics.leftovers):
        names.add(metric._name + "_total")  # counters without samples yet
    for histogram in (metrics.operation_duration, metrics.step_duration):
        names |= {histogram._name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return names


def test_dashboard_queries_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p.get("targets", []))
    used = {m for expr in exprs for m in re.findall(r"\b((?:vm|metald)_[a-z_]+)\{", expr)}
    assert used - exported_names(tmp_path) == set()
    for wanted in ("vm_instances", "metald_operations_total", "metald_operation_failures_total",
                   "metald_operation_duration_seconds_bucket", "metald_plan_step_duration_seconds_bucket",
                   "metald_vmm_exits_total", "metald_ip_pool_free", "metald_reconcile_duration_seconds",
                   *(name for name, _, _ in PER_VM)):
        assert wanted in used, wanted
