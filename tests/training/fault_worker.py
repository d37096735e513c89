"""Run by tests/training/test_faults.py: ``lowbit`` with a fault injected, in a process of its own.

    python fault_worker.py '{"kill": [STEP, PHASE]}' -- train config.yaml [--resume] ...
    python fault_worker.py '{"fsize": BYTES}' -- train ...

kill phases: ``forward`` (in STEP's first training forward), ``optimizer`` (right after STEP's optimizer
update), ``checkpoint`` (halfway through writing STEP's checkpoint: a cut file is left in its temporary folder).
``fsize``: no file may grow past BYTES (a full disk, as one process sees it).
"""

import json
import os
import resource
import signal
import sys


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    opts = json.loads(sys.argv[1])
    args = sys.argv[sys.argv.index("--") + 1:]
    if "fsize" in opts:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (opts["fsize"], opts["fsize"]))
    if "kill" in opts:
        step, phase = opts["kill"]
        import torch

        from lowbit.training import loss, state

        armed = {"on": False}
        real_keys, real_finish, real_loss = state.TrainState.next_keys, state.TrainState.finish_step, loss.lm_loss

        def next_keys(self, *a, **k):  # the start of step self.step + 1
            armed["on"] = phase == "forward" and self.step + 1 == step
            return real_keys(self, *a, **k)

        def lm_loss(*a, **k):
            if armed["on"] and torch.is_grad_enabled():
                die()
            return real_loss(*a, **k)

        def finish_step(self, *a, **k):  # right after the optimizer update of step self.step + 1
            if phase == "optimizer" and self.step + 1 == step:
                die()
            return real_finish(self, *a, **k)

        state.TrainState.next_keys, state.TrainState.finish_step, loss.lm_loss = next_keys, finish_step, lm_loss
        if phase == "checkpoint":
            import safetensors.torch

            real_save = safetensors.torch.save_file

            def save_file(tensors, filename, *a, **k):
                real_save(tensors, filename, *a, **k)
                if f".step-{step:07d}.tmp-" in str(filename) and str(filename).endswith("trainer_state.safetensors"):
                    os.truncate(filename, os.path.getsize(filename) // 2)
                    die()

            safetensors.torch.save_file = save_file
    from lowbit import cli

    sys.exit(cli.main(args))


if __name__ == "__main__":
    main()
