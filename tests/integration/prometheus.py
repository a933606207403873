"""A real Prometheus server (Debian's ``prometheus``) for the metrics tests: scrapes
given targets every second, loads the shipped alert rules, answers PromQL queries."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from blocktxn import procs
from blocktxn.demo.lab import free_port

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "blocktxn-alerts.yml"


class PrometheusServer:
    def __init__(self, workdir: Path, jobs: dict[str, list[str]],
                 tls: dict[str, dict[str, str]] | None = None) -> None:
        """*jobs*: scrape job name -> HOST:PORT targets; *tls*: job name -> its
        ``tls_config`` (the job then scrapes over HTTPS)."""
        self.workdir, self.jobs, self.tls = workdir, jobs, tls or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Raises: FileNotFoundError (no prometheus), RuntimeError, TimeoutError."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus not found: apt-get install prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, self.workdir / RULES.name)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": [RULES.name],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}],
                                **({"scheme": "https", "tls_config": self.tls[job]}
                                   if job in self.tls else {})}
                               for job, targets in self.jobs.items()],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.proc = subprocess.Popen(
            [binary, "--config.file", str(self.workdir / "prometheus.yml"),
             "--storage.tsdb.path", str(self.workdir / "data"),
             "--web.listen-address", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "prometheus.log", "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see "
                                   f"{self.workdir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def stop(self) -> None:
        procs.terminate(self.proc)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query: each series' labels (without __name__) -> its value."""
        data = self.api("query", query=promql)
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")):
                float(r["value"][1]) for r in data["result"]}

    def wait_for(self, promql: str, check: Any, timeout: float = 30.0
                 ) -> dict[tuple[tuple[str, str], ...], float]:
        """Query *promql* until *check(result)* holds (the next scrapes may be needed)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: {result}")
            time.sleep(0.5)

    def evaluated_rules(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every loaded rule, once each has been evaluated at least once."""
        deadline = time.monotonic() + timeout
        while True:
            rules = [r for g in self.api("rules")["groups"] for r in g["rules"]]
            if rules and all(r["health"] != "unknown" for r in rules):
                return rules
            if time.monotonic() > deadline:
                raise AssertionError(f"rules not evaluated: {rules}")
            time.sleep(0.5)
