"""StopOnSignal: a signal becomes a stop request that every rank acts on at the same call."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from spawn import free_port, run_in_child, run_workers

from batteries import StopOnSignal


def test_a_signal_stops_the_next_call_in_one_process():
    def child():
        stop = StopOnSignal()
        before = [stop() for _ in range(3)]
        os.kill(os.getpid(), signal.SIGTERM)
        return {"before": before, "after": [stop(), stop()], "name": stop.signal_name, "code": stop.exit_code}

    assert run_in_child(child) == {"before": [False] * 3, "after": [True, True], "name": "SIGTERM", "code": 143}


@pytest.mark.parametrize("sig", ["SIGINT", "SIGUSR1"])
def test_sigint_and_sigusr1_are_requests_too_and_raise_nothing(sig):
    def child():
        stop = StopOnSignal()
        os.kill(os.getpid(), getattr(signal, sig))  # SIGINT would raise KeyboardInterrupt; SIGUSR1 would kill
        return {"stopped": stop(), "name": stop.signal_name, "code": stop.exit_code}

    expected = {"SIGINT": 130, "SIGUSR1": 138}[sig]
    assert run_in_child(child) == {"stopped": True, "name": sig, "code": expected}


def test_close_restores_the_previous_handlers():
    def child():
        def mine(signum, frame):
            pass

        signal.signal(signal.SIGUSR1, mine)
        sigint = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background
        with StopOnSignal():
            inside = signal.getsignal(signal.SIGUSR1) is not mine
        return {"inside": inside, "after": signal.getsignal(signal.SIGUSR1) is mine,
                "sigint": signal.getsignal(signal.SIGINT) is sigint}  # fmt: skip

    assert run_in_child(child) == {"inside": True, "after": True, "sigint": True}


def test_a_signal_listed_twice_is_handled_once_and_close_restores_the_handler_from_before():
    def child():
        def mine(signum, frame):
            pass

        signal.signal(signal.SIGUSR1, mine)
        stop = StopOnSignal(signals=[signal.SIGUSR1, signal.SIGUSR1])
        signals = [s.name for s in stop.signals]
        stop.close()
        return {"signals": signals, "after": signal.getsignal(signal.SIGUSR1) is mine}

    assert run_in_child(child) == {"signals": ["SIGUSR1"], "after": True}


def test_requested_is_this_rank_s_signal_before_any_agreement():
    def child():
        stop = StopOnSignal(every=1000)
        before = stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        return {"before": before, "after": stop.requested, "stopped": stop.stopped, "name": stop.signal_name}

    assert run_in_child(child) == {"before": False, "after": True, "stopped": False, "name": "SIGUSR1"}


PEER_DIES = textwrap.dedent(
    """
    import datetime, json, os, signal, sys, time
    import torch.distributed as dist
    from batteries import StopOnSignal
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    stop = StopOnSignal(every=1)
    dist.barrier()
    if rank == 1:
        os._exit(0)  # dies without joining the next agreement
    stop()  # starts an agreement its peer never joins
    try:
        stop.close()
        error = None
    except Exception as caught:  # gloo: the peer closed the connection
        error = isinstance(caught, RuntimeError)
    restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    StopOnSignal().close()  # a new one can be built
    print(json.dumps({"error": error, "restored": restored}), flush=True)
    os._exit(0)
    """
)


def test_close_restores_the_handlers_also_when_the_last_agreement_fails():
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", PEER_DIES, str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]  # fmt: skip
    try:
        stdout, stderr = ranks[0].communicate(timeout=60)
        assert json.loads(stdout) == {"error": True, "restored": True}, stderr
    finally:
        for process in ranks:
            process.kill()
            process.communicate()


SECOND_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time
    from batteries import StopOnSignal
    stop = StopOnSignal(repeat_window_s=float(sys.argv[1]))
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # the same request delivered twice (the terminal and a launcher)
    print("still running", stop(), flush=True)
    time.sleep(float(sys.argv[2]))
    os.kill(os.getpid(), signal.SIGINT)  # a second request, after the window
    time.sleep(5)
    print("not reached", flush=True)
    """
)


def test_a_repeat_within_the_window_is_the_same_request_and_a_later_one_exits_at_once():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, "0.2", "0.4"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.stdout == "still running True\n"
    assert result.returncode == -signal.SIGINT  # ended by the signal itself: the shell shows 130
    assert "Traceback" not in result.stderr and "SIGINT again" in result.stderr
    assert time.monotonic() - started < 5 + 30  # it did not sleep the 5 s out (startup aside)


SLOW_PEER = textwrap.dedent(
    """
    import datetime, sys, time
    import torch.distributed as dist
    from batteries import StopOnSignal
    rank, where, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    stop = StopOnSignal(every=1, repeat_window_s=0.2)
    if rank == 1:
        time.sleep(60)  # the slow peer: rank 0 waits for it in C, where Python runs no signal handler
    print("waiting", flush=True)
    if where == "stop(wait=True)":
        stop(wait=True)
    elif where == "agreement":
        stop()  # starts an agreement
        stop()  # waits for it
    else:
        dist.barrier()  # a collective of the training loop
    print("not reached", flush=True)
    """
)


@pytest.mark.parametrize("where", ["stop(wait=True)", "agreement", "barrier"])
def test_a_second_signal_ends_the_process_while_it_waits_in_a_collective_for_a_slow_peer(where):
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", SLOW_PEER, str(rank), where, port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]  # fmt: skip
    try:
        assert ranks[0].stdout.readline() == "waiting\n"
        time.sleep(0.2)  # in the collective by now
        ranks[0].send_signal(signal.SIGTERM)  # the request: the step cannot finish while the peer is slow
        time.sleep(0.4)
        ranks[0].send_signal(signal.SIGTERM)  # after the repeat window: exit at once
        _, stderr = ranks[0].communicate(timeout=10)
        assert ranks[0].returncode == -signal.SIGTERM, stderr
        assert "SIGTERM again: exiting at once" in stderr
    finally:
        for process in ranks:
            process.kill()
            process.communicate()


def test_bad_arguments_are_refused_at_the_call():
    with pytest.raises(ValueError, match="every"):
        StopOnSignal(every=0)
    with pytest.raises(ValueError, match="interval_s"):
        StopOnSignal(interval_s=0)
    with pytest.raises(TypeError, match="every"):
        StopOnSignal(every=True)
    with pytest.raises(ValueError, match="repeat_window_s"):
        StopOnSignal(repeat_window_s=-1)
    with pytest.raises(ValueError, match="signals"):
        StopOnSignal(signals=["SIGTERM"])
    with pytest.raises(ValueError, match="signals"):
        StopOnSignal(signals=[signal.SIGKILL])
    with pytest.raises(ValueError, match="signals"):
        StopOnSignal(signals=[signal.SIGUSR1, signal.SIGSTOP])
    with pytest.raises(ValueError, match="signals"):
        StopOnSignal(signals=[])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # nothing was installed by a refused call
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_one_active_instance_at_a_time_and_close_in_the_main_thread():
    def child():
        first = StopOnSignal()
        try:
            StopOnSignal()
        except RuntimeError as error:
            refused = "another StopOnSignal is active" in str(error)
        errors = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, first.close)))
        thread.start()
        thread.join()
        first.close()
        first.close()  # twice: a no-op
        second = StopOnSignal()  # allowed once the first is closed
        os.kill(os.getpid(), signal.SIGTERM)
        return {"refused": refused, "thread": "main thread" in str(errors[0].value), "second": second(),
                "code_before": first.exit_code}  # fmt: skip

    assert run_in_child(child) == {"refused": True, "thread": True, "second": True, "code_before": 0}


def test_built_outside_the_main_thread_is_an_error():
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, StopOnSignal)))
    thread.start()
    thread.join()
    assert "main thread" in str(errors[0].value)


def ranks_stop_together(rank, world_size, signal_at, everies):
    """For each ``every``: rank 1 signals itself at call ``signal_at``; the call at which this rank stopped.
    With ``every`` "wait", the calls after the signal agree at once (``stop(wait=True)``)."""
    results = {}
    for every in everies:
        if every == "adaptive":  # the default: about every interval_s seconds, the spacing agreed by all ranks
            stop = StopOnSignal(interval_s=0.02)
        else:
            stop = StopOnSignal(every=1 if every == "wait" else every)
        for call in range(1, 200):
            if rank == 1 and call == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.002 * rank)  # rank 2 is the slowest: the answer must not depend on timing
            if stop(wait=every == "wait" and call >= signal_at):
                break
        stop.close()
        results[every] = (call, stop.signal_name, stop.exit_code)
    return results


def test_every_rank_stops_at_the_same_call_and_knows_the_signal():
    everies = [1, 3, "wait", "adaptive"]
    results = run_workers(ranks_stop_together, 3, 5, everies, timeout_s=60)
    for every in everies:
        calls = {rank_results[every][0] for rank_results in results}
        assert len(calls) == 1, results
        (call,) = calls
        if every == "wait":
            assert call == 5  # agreed at the call itself
        elif every == "adaptive":  # calls of 2-4 ms: agreements every 5 to 10 calls
            assert 5 < call <= 5 + 30
        else:
            assert 5 < call <= 5 + 2 * every  # acted on within two agreements
        # only rank 1 received it; every rank learns which signal it was (for its log line and status)
        assert [r[every][1:] for r in results] == [("SIGUSR1", 138)] * 3


def built_before_the_group(rank, world_size):
    import datetime

    import torch.distributed as dist

    stop = StopOnSignal()
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=30))
    try:
        stop()
    except RuntimeError as error:
        return str(error)
    finally:
        stop.close()
        dist.destroy_process_group()


def test_built_before_the_process_group_is_an_error_at_the_call_not_a_rank_stopping_alone():
    for message in run_workers(built_before_the_group, 2, timeout_s=60, init_group=False):
        assert "built before the process group existed" in message


TORCHRUN_WORKER = textwrap.dedent(
    """
    import os, sys, time
    os.environ["TORCHELASTIC_RUN_ID"] = "test"  # as torchrun sets it for its workers
    from batteries import StopOnSignal
    stop = StopOnSignal()
    print("ready", flush=True)
    deadline = time.monotonic() + 30  # never left running if the request does not come
    while not stop() and time.monotonic() < deadline:
        time.sleep(0.01)
    print("stopped by", stop.signal_name, flush=True)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_torchrun_worker_whose_agent_dies_gets_a_stop_request_not_orphaned():
    """An agent killed by a signal it does not handle (SIGKILL, SIGUSR1): its workers stop as on SIGTERM."""
    agent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1]]).wait()",
         TORCHRUN_WORKER], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert agent.stdout.readline() == "ready\n"
        agent.kill()  # the "agent" dies; its worker is orphaned
        agent.wait(timeout=10)
        assert agent.stdout.readline() == "stopped by SIGTERM\n"  # the worker inherited the pipe
    finally:
        agent.kill()
