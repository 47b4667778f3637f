"""The sandbox gateway over real HTTP: scripts, state, control API, misbehaviours, CLI."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
import requests
from typer.testing import CliRunner

from billing.answers import parse_body
from billing.cli import app
from billing.errors import ConfigError, InvalidInput
from billing.sandbox import Sandbox, is_loopback
from tests.fixtures.sandbox import (
    BILLING,
    EUR_KEY,
    EUR_MERCHANT,
    USD_KEY,
    USD_MERCHANT,
    SandboxControl,
    SandboxProcess,
    start_sandbox_process,
    stop_sandbox_process,
)

IP = "198.51.100.4"
CARD_FORM = {
    "ID": EUR_MERCHANT,
    "IP": IP,
    "NOM": "Martin",
    "PRENOM": "Claire",
    "ADRESSE": "1 rue",
    "CODEPOSTAL": "75002",
    "VILLE": "Paris",
    "PAYS": "FR",
    "EMAIL": "c@example.org",
    "TEL": "0100000000",
    "MONTANT": "29.90",
    "NUMCARTE": "4012888888881881",
    "EXPMOIS": "12",
    "EXPANNEE": "2099",
    "CVV": "111",
}


def dup_form(alias: str, amount: str = "10.00", **extra: str) -> dict[str, str]:
    return {
        "ID": EUR_MERCHANT,
        "IP": IP,
        "MONTANT": amount,
        "ALIAS": alias,
        "PRIVATE_KEY": EUR_KEY,
        **extra,
    }


def post(url: str, script: str, form: dict[str, str], **kwargs: Any) -> dict[str, str]:
    response = requests.post(f"{url}/{script}", data=form, timeout=5, **kwargs)
    assert response.status_code == 200, response.text
    return parse_body(response.text)


# --- the answer format, by hand ---------------------------------------------------------


def test_plain_form_post_to_duplicate(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    response = requests.post(f"{sandbox_url}/duplicate.pl", data=dup_form(alias, "30"), timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    assert text.startswith("RESPONSE=00&TX=")
    answer = parse_body(text)
    assert set(answer) == {"RESPONSE", "TX", "ALIAS", "MONTANT", "MESSAGE"}
    assert answer["ALIAS"] == alias and answer["MONTANT"] == "30.00"
    declined = parse_body(
        requests.post(f"{sandbox_url}/duplicate.pl", data=dup_form("nope", "30"), timeout=5).text
    )
    assert declined["RESPONSE"] == "ALIAS" and declined["MESSAGE"]
    assert "TX" not in declined


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_d_gets_the_same_shape(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    args = ["curl", "-sS", "--max-time", "5", f"{sandbox_url}/duplicate.pl"]
    for key, value in dup_form(alias, "12.5").items():
        args += ["-d", f"{key}={value}"]
    text = subprocess.run(args, check=True, capture_output=True, text=True, timeout=10).stdout
    answer = parse_body(text)
    assert answer["RESPONSE"] == "00" and answer["MONTANT"] == "12.50" and answer["TX"]
    # curl -F (multipart, as PHP's curl sends an array) is understood too.
    args = ["curl", "-sS", "--max-time", "5", f"{sandbox_url}/duplicate.pl"]
    for key, value in dup_form(alias, "1").items():
        args += ["-F", f"{key}={value}"]
    text = subprocess.run(args, check=True, capture_output=True, text=True, timeout=10).stdout
    assert parse_body(text)["RESPONSE"] == "00"


def test_multipart_form(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    files = {key: (None, value) for key, value in dup_form(alias).items()}
    response = requests.post(f"{sandbox_url}/duplicate.pl", files=files, timeout=5)
    assert parse_body(response.text)["RESPONSE"] == "00"


def test_scripts_under_paiement_prefix(sandbox_url: str) -> None:
    answer = post(sandbox_url + "/paiement", "server_server.pl", CARD_FORM)
    assert answer["RESPONSE"] == "00" and answer["ALIAS"]


def test_wrong_method_and_path_are_not_recorded(
    sandbox_url: str, sandbox_control: SandboxControl
) -> None:
    assert requests.get(f"{sandbox_url}/duplicate.pl", timeout=5).status_code == 405
    assert requests.post(f"{sandbox_url}/nothing.pl", timeout=5).status_code == 404
    assert requests.post(f"{sandbox_url}/x/duplicate.pl", timeout=5).status_code == 404
    assert sandbox_control.calls() == []


def test_missing_field_is_declined_input(sandbox_url: str) -> None:
    form = dict(CARD_FORM)
    del form["TEL"]
    answer = post(sandbox_url, "server_server.pl", form)
    assert answer["RESPONSE"] == "INPUT" and "TEL" in answer["MESSAGE"]
    assert post(sandbox_url, "duplicate.pl", dup_form("a", "0"))["RESPONSE"] == "INPUT"


def test_field_names_any_case(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    form = {key.lower(): value for key, value in dup_form(alias).items()}
    assert post(sandbox_url, "duplicate.pl", form)["RESPONSE"] == "00"


def test_direct_deferred_then_duplicate_of_issued_alias(
    sandbox_url: str, sandbox_control: SandboxControl
) -> None:
    first = post(sandbox_url, "server_server.pl", {**CARD_FORM, "DIFFERE": "1"})
    assert first["RESPONSE"] == "00"
    assert sandbox_control.transaction(first["TX"])["status"] == "authorized"
    again = post(sandbox_url, "duplicate.pl", dup_form(first["ALIAS"]))
    assert again["RESPONSE"] == "00" and again["ALIAS"] == first["ALIAS"]
    # An alias is registered to its merchant only.
    other = {**dup_form(first["ALIAS"]), "ID": USD_MERCHANT, "PRIVATE_KEY": USD_KEY}
    assert post(sandbox_url, "duplicate.pl", other)["RESPONSE"] == "ALIAS"


def test_direct_payment_current_month_is_not_expired(sandbox_url: str) -> None:
    now = time.gmtime()
    form = {**CARD_FORM, "EXPMOIS": f"{now.tm_mon:02d}", "EXPANNEE": str(now.tm_year)}
    assert post(sandbox_url, "server_server.pl", form)["RESPONSE"] == "00"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_veriftransaction(sandbox_url: str, sandbox_control: SandboxControl, method: str) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    tx = post(sandbox_url, "duplicate.pl", dup_form(alias, "30"))["TX"]
    params = {"ID": EUR_MERCHANT, "NUMXKP": tx}
    text = requests.request(
        method, f"{sandbox_url}/veriftransaction.pl", params=params, timeout=5
    ).text
    parts = text.split("|")
    assert parts[:2] == ["VALIDATIONYES", "30.00"] and parts[2].isdigit()
    params["ID"] = USD_MERCHANT
    assert (
        requests.get(f"{sandbox_url}/veriftransaction.pl", params=params, timeout=5).text
        == "VALIDATIONNO"
    )
    assert [c["result"] for c in sandbox_control.calls(script="veriftransaction")] == [
        "found",
        "not_found",
    ]


# --- control API ------------------------------------------------------------------------


def test_reset_keeps_accounts_and_runtime_accounts(
    sandbox_url: str, sandbox_control: SandboxControl
) -> None:
    sandbox_control.add_account("5550001", "gbp-key")
    [alias] = sandbox_control.seed_aliases("5550001", 1)
    form = {**dup_form(alias), "ID": "5550001", "PRIVATE_KEY": "gbp-key"}
    assert post(sandbox_url, "duplicate.pl", form)["RESPONSE"] == "00"
    assert sandbox_control.totals()["5550001"]["collected"] == "10.00"
    sandbox_control.reset()
    assert sandbox_control.calls() == [] and sandbox_control.totals() == {}
    # Aliases are gone, the account stays.
    assert post(sandbox_url, "duplicate.pl", form)["RESPONSE"] == "ALIAS"
    [alias] = sandbox_control.seed_aliases("5550001", 1)
    assert post(sandbox_url, "duplicate.pl", {**form, "ALIAS": alias})["RESPONSE"] == "00"
    merchants = requests.get(f"{sandbox_url}/_sandbox/accounts", timeout=5).json()["merchants"]
    assert "5550001" in merchants and "gbp-key" not in str(merchants)


def test_seed_100k_aliases_quickly(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    started = time.monotonic()
    aliases = sandbox_control.seed_aliases(USD_MERCHANT, 100_000)
    assert time.monotonic() - started < 5
    assert len(set(aliases)) == 100_000
    form = {**dup_form(aliases[-1]), "ID": USD_MERCHANT, "PRIVATE_KEY": USD_KEY}
    assert post(sandbox_url, "duplicate.pl", form)["RESPONSE"] == "00"


def test_seed_given_aliases(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    assert sandbox_control.add_aliases(EUR_MERCHANT, ["sub-0001-card", "sub-0002-card"]) == [
        "sub-0001-card",
        "sub-0002-card",
    ]
    assert post(sandbox_url, "duplicate.pl", dup_form("sub-0002-card"))["RESPONSE"] == "00"
    refused = requests.post(
        f"{sandbox_url}/_sandbox/aliases",
        timeout=5,
        json={"merchant_id": USD_MERCHANT, "aliases": ["sub-0001-card"]},
    )
    assert refused.status_code == 400 and "another merchant" in refused.json()["error"]
    unknown = requests.post(
        f"{sandbox_url}/_sandbox/aliases", timeout=5, json={"merchant_id": "nobody", "count": 1}
    )
    assert unknown.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"alias": "a", "behaviour": {"explode": True}},
        {"alias": "a", "behaviour": {"decline": "05", "garbage": True}},
        {"alias": "a", "behaviour": {"decline": "00"}},
        {"alias": "a", "behaviour": {"unavailable": 0}},
        {"alias": "a", "behaviour": {"slow": -1}},
        {"alias": "a", "behaviour": {}},
        {"alias": "", "behaviour": {"garbage": True}},
    ],
)
def test_bad_behaviours_are_refused(sandbox_url: str, body: dict[str, Any]) -> None:
    response = requests.post(f"{sandbox_url}/_sandbox/behaviours", json=body, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]


def test_control_errors(sandbox_url: str) -> None:
    base = f"{sandbox_url}/_sandbox"
    assert requests.post(f"{base}/latency", data="{nope", timeout=5).status_code == 400
    assert requests.post(f"{base}/latency", json=[1], timeout=5).status_code == 400
    assert requests.post(f"{base}/latency", json={"ms": -5}, timeout=5).status_code == 400
    assert requests.get(f"{base}/unknown", timeout=5).status_code == 404
    assert requests.get(f"{base}/reset", timeout=5).status_code == 400
    assert requests.get(f"{base}/transactions/404", timeout=5).status_code == 404
    assert requests.get(f"{base}/calls", params={"since": "x"}, timeout=5).status_code == 400
    assert (
        requests.post(f"{base}/faults", json={"refuse": 0.7, "garbage": 0.5}, timeout=5).status_code
        == 400
    )
    assert requests.post(f"{base}/faults", json={"meteor": 0.1}, timeout=5).status_code == 400


def test_behaviours_list_and_clear(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    a, b = sandbox_control.seed_aliases(EUR_MERCHANT, 2)
    sandbox_control.set_behaviour(a, decline="05")
    sandbox_control.set_behaviour(b, slow=0.01, garbage=True)
    listed = requests.get(f"{sandbox_url}/_sandbox/behaviours", timeout=5).json()["behaviours"]
    assert listed == {a: {"decline": "05"}, b: {"slow": 0.01, "garbage": True}}
    sandbox_control.clear_behaviours(a)
    assert post(sandbox_url, "duplicate.pl", dup_form(a))["RESPONSE"] == "00"
    cleared = requests.post(f"{sandbox_url}/_sandbox/behaviours/clear", json={}, timeout=5)
    assert cleared.status_code == 200
    assert post(sandbox_url, "duplicate.pl", dup_form(b))["RESPONSE"] == "00"
    sandbox_control.set_behaviour(b, decline="05")
    sandbox_control.clear_behaviours()
    assert post(sandbox_url, "duplicate.pl", dup_form(b))["RESPONSE"] == "00"


def test_behaviour_times_then_normal(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_behaviour(alias, garbage=True, times=2)
    statuses = []
    for _ in range(3):
        response = requests.post(f"{sandbox_url}/duplicate.pl", data=dup_form(alias), timeout=5)
        statuses.append((response.status_code, "RESPONSE" in parse_body(response.text)))
    assert statuses == [(200, False), (200, False), (200, True)]
    calls = sandbox_control.calls(alias=alias)
    assert [c["result"] for c in calls] == ["garbage", "garbage", "approved"]
    assert all(c["recorded"] for c in calls)
    assert sandbox_control.totals()[EUR_MERCHANT]["collected"] == "30.00"


def test_error_500_and_drop(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    a, b = sandbox_control.seed_aliases(EUR_MERCHANT, 2)
    sandbox_control.set_behaviour(a, error_500_after_record=True)
    sandbox_control.set_behaviour(b, drop_after_record=True)
    assert (
        requests.post(f"{sandbox_url}/duplicate.pl", data=dup_form(a), timeout=5).status_code == 500
    )
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{sandbox_url}/duplicate.pl", data=dup_form(b), timeout=5)
    assert [c["recorded"] for c in sandbox_control.calls()] == [True, True]


def test_latency(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    sandbox_control.set_latency(150)
    started = time.monotonic()
    post(sandbox_url, "duplicate.pl", dup_form(alias))
    assert time.monotonic() - started >= 0.15
    sandbox_control.set_latency(0)
    latency = requests.get(f"{sandbox_url}/_sandbox/latency", timeout=5).json()
    assert latency == {"ms": 0}


def _chaos_run(url: str, control: SandboxControl, seed: int) -> list[str]:
    control.reset()
    aliases = control.seed_aliases(EUR_MERCHANT, 50)
    control.faults(
        seed=seed,
        refuse=0.1,
        error_500_after_record=0.1,
        drop_after_record=0.1,
        garbage=0.1,
        soft_decline=0.1,
    )
    with requests.Session() as http:
        for alias in aliases * 4:
            with contextlib.suppress(requests.ConnectionError):
                http.post(f"{url}/duplicate.pl", data=dup_form(alias, "1.00"), timeout=5)
    return [f"{c['result']}:{c['code']}" for c in control.calls()]


def test_random_faults_are_reproducible_and_add_up(
    sandbox_url: str, sandbox_control: SandboxControl
) -> None:
    first = _chaos_run(sandbox_url, sandbox_control, seed=7)
    calls = sandbox_control.calls()
    results = {c["result"] for c in calls}
    assert {"approved", "declined", "unavailable", "error_500", "dropped", "garbage"} <= results
    recorded = sum(1 for c in calls if c["recorded"])
    assert sandbox_control.totals()[EUR_MERCHANT]["collected"] == f"{recorded}.00"
    assert not any(c["recorded"] for c in calls if c["result"] in ("unavailable", "declined"))
    assert {c["code"] for c in calls if c["result"] == "declined"} <= {"05", "51", "91"}
    assert _chaos_run(sandbox_url, sandbox_control, seed=7) == first
    sandbox_control.faults()  # clears
    assert requests.get(f"{sandbox_url}/_sandbox/faults", timeout=5).json()["faults"] == {
        "seed": None
    }


def test_hostile_faults_rewrite_the_answer_after_the_money_moved_as_asked(
    sandbox_url: str, sandbox_control: SandboxControl
) -> None:
    aliases = sandbox_control.seed_aliases(EUR_MERCHANT, 120)
    sandbox_control.faults(
        seed=3, answer_in_503=0.25, long_message=0.25, bad_tx=0.25, amount_lie=0.25
    )
    answers = []
    for alias in aliases:
        response = requests.post(f"{sandbox_url}/duplicate.pl", data=dup_form(alias), timeout=5)
        answers.append((response.status_code, parse_body(response.text)))
    calls = sandbox_control.calls()

    seen: dict[str, set[str]] = {}
    for call, (status, body) in zip(calls, answers, strict=True):
        fault = call["fault"]
        seen.setdefault(fault, set()).add(call["result"])
        assert call["rewritten"]
        if fault == "answer_in_503":
            assert status in (503, 429) and body["RESPONSE"] in ("00", "05", "51", "91")
            assert call["recorded"] is (body["RESPONSE"] == "00")
            continue
        assert (status, body["RESPONSE"], call["result"]) == (200, "00", "approved")
        if fault == "long_message":
            assert len(body["MESSAGE"]) > 400 and body["TX"] == call["tx"]
        elif fault == "bad_tx":
            assert body["TX"] == "<b>TX</b>&ID=1" and call["tx"].isdigit()
        else:
            assert (fault, body["MONTANT"], body["TX"]) == ("amount_lie", "11.00", call["tx"])
    # Declines behind a busy status too; the others rewrite approvals only.
    assert seen["answer_in_503"] == {"approved", "declined"}
    assert [seen[k] for k in ("long_message", "bad_tx", "amount_lie")] == [{"approved"}] * 3
    # The money moved as asked, whatever the answers said.
    recorded = sum(1 for c in calls if c["recorded"])
    assert sandbox_control.totals()[EUR_MERCHANT]["collected"] == f"{10 * recorded}.00"


def test_a_hostile_fault_with_nothing_to_rewrite_is_no_fault_met(
    sandbox_url: str, sandbox_control: SandboxControl
) -> None:
    sandbox_control.faults(seed=1, bad_tx=1.0)
    answer = post(sandbox_url, "duplicate.pl", dup_form("never-issued"))
    assert answer["RESPONSE"] == "ALIAS"
    assert [(c["result"], c["fault"]) for c in sandbox_control.calls()] == [("declined", None)]


def test_calls_filters(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    a, b = sandbox_control.seed_aliases(EUR_MERCHANT, 2)
    tx = post(sandbox_url, "duplicate.pl", dup_form(a))["TX"]
    post(sandbox_url, "duplicate.pl", dup_form(b))
    post(
        sandbox_url,
        "cancel_transaction.pl",
        {"ID": EUR_MERCHANT, "TX": tx, "MONTANT": "1", "PRIVATE_KEY": EUR_KEY},
    )
    assert [c["script"] for c in sandbox_control.calls(alias=a)] == [
        "duplicate",
        "cancel_transaction",
    ]
    assert len(sandbox_control.calls(script="duplicate")) == 2
    assert len(sandbox_control.calls(script="duplicate.pl")) == 2
    calls = sandbox_control.calls()
    assert [c["seq"] for c in calls] == [1, 2, 3]
    later = requests.get(f"{sandbox_url}/_sandbox/calls", params={"since": 2}, timeout=5).json()
    assert [c["seq"] for c in later["calls"]] == [3]
    assert set(calls[0]) == {
        "seq",
        "script",
        "merchant_id",
        "alias",
        "tx",
        "amount",
        "deferred",
        "result",
        "code",
        "recorded",
        "fault",
        "at",
    }
    assert calls[0]["fault"] is None  # no random fault met


def test_outage_from_control_api(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    started = time.monotonic()
    sandbox_control.outage(1.0)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{sandbox_url}/_sandbox/health", timeout=2)
    sandbox_control.wait_ready(10)
    assert time.monotonic() - started >= 0.9
    assert sandbox_control.calls() == []


def test_concurrent_calls_keep_state_consistent(
    sandbox_url: str, sandbox_control: SandboxControl
) -> None:
    aliases = sandbox_control.seed_aliases(EUR_MERCHANT, 8)
    errors: list[BaseException] = []

    def worker(alias: str) -> None:
        try:
            with requests.Session() as http:
                for _ in range(40):
                    answer = parse_body(
                        http.post(
                            f"{sandbox_url}/duplicate.pl", data=dup_form(alias, "0.01"), timeout=10
                        ).text
                    )
                    assert answer["RESPONSE"] == "00"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(a,)) for a in aliases]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert errors == []
    calls = sandbox_control.calls()
    assert len(calls) == 320 and len({c["tx"] for c in calls}) == 320
    assert sandbox_control.totals()[EUR_MERCHANT]["collected"] == "3.20"
    assert 320 / elapsed > 50  # a few hundred per second on an idle core; slack for load


def test_sandbox_refuses_public_host_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        Sandbox("0.0.0.0")
    with pytest.raises(ConfigError):
        Sandbox("example.org")
    assert Sandbox("0.0.0.0", allow_public=True).url.startswith("http://0.0.0.0")
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1")


def test_ipv6_loopback() -> None:
    try:
        server = Sandbox("::1", 0, accounts={"1": "k"}).start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert server.url.startswith("http://[::1]:")
        assert requests.get(f"{server.url}/_sandbox/health", timeout=5).json() == {"ok": True}
    finally:
        server.stop()


def test_in_process_start_stop_and_state_api() -> None:
    with Sandbox(accounts={"42": "k"}, latency=0) as server:
        [alias] = server.state.seed_aliases("42", count=1)
        answer = post(
            server.url,
            "duplicate.pl",
            {"ID": "42", "IP": IP, "MONTANT": "7", "ALIAS": alias, "PRIVATE_KEY": "k"},
        )
        assert answer["RESPONSE"] == "00"
        assert server.state.totals() == {
            "42": {
                "collected": "7.00",
                "authorized": "0.00",
                "refunded": "0.00",
                "released": "0.00",
            }
        }
        url = server.url
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/_sandbox/health", timeout=2)


# --- CLI --------------------------------------------------------------------------------


def test_cli_round_trip_and_sigterm() -> None:
    running = start_sandbox_process()
    try:
        assert running.url.startswith("http://127.0.0.1:")
        [alias] = running.control.seed_aliases(EUR_MERCHANT, 1)
        answer = post(running.url, "duplicate.pl", dup_form(alias, "29.90"))
        assert answer["RESPONSE"] == "00" and answer["MONTANT"] == "29.90"
        assert running.control.totals()[EUR_MERCHANT]["collected"] == "29.90"
    finally:
        assert stop_sandbox_process(running) == 0
    rest = running.process.stdout.read() if running.process.stdout else ""
    assert "sandbox stopped" in rest and EUR_KEY not in rest


def test_cli_sigint_and_latency_and_demo_accounts() -> None:
    running = start_sandbox_process(accounts={}, extra=["--latency-ms", "100"])
    try:
        [alias] = running.control.seed_aliases(EUR_MERCHANT, 1)  # demo account exists
        started = time.monotonic()
        assert post(running.url, "duplicate.pl", dup_form(alias))["RESPONSE"] == "00"
        assert time.monotonic() - started >= 0.1
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(10) == 0
    finally:
        stop_sandbox_process(running)


def test_sandbox_process_fixture(sandbox_process: SandboxProcess) -> None:
    [alias] = sandbox_process.control.seed_aliases(USD_MERCHANT, 1)
    form = {**dup_form(alias), "ID": USD_MERCHANT, "PRIVATE_KEY": USD_KEY}
    assert post(sandbox_process.url, "duplicate.pl", form)["RESPONSE"] == "00"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--host", "0.0.0.0"], "loopback"),
        (["--account", "1234567:secret-never-shown"], "--account #1"),
    ],
)
def test_cli_bad_arguments(args: list[str], expected: str) -> None:
    result = subprocess.run([BILLING, "sandbox", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "secret-never-shown" not in result.stderr + result.stdout


def test_cli_port_in_use_and_bad_port() -> None:
    runner = CliRunner()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["sandbox", "--port", str(port)])
    assert isinstance(result.exception, ConfigError)
    assert result.exception.exit_code == 2 and "cannot listen" in str(result.exception)
    result = runner.invoke(app, ["sandbox", "--port", "70000"])
    assert isinstance(result.exception, InvalidInput) and "--port" in str(result.exception)
    result = runner.invoke(app, ["sandbox", "--latency-ms", "-1"])
    assert isinstance(result.exception, InvalidInput)


def test_amounts_are_decimal_strings(sandbox_url: str, sandbox_control: SandboxControl) -> None:
    [alias] = sandbox_control.seed_aliases(EUR_MERCHANT, 1)
    for amount in ("0.10", "0.20"):
        post(sandbox_url, "duplicate.pl", dup_form(alias, amount))
    collected = sandbox_control.totals()[EUR_MERCHANT]["collected"]
    assert collected == "0.30" and Decimal(collected) == Decimal("0.1") + Decimal("0.2")
