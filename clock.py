"""The run's clock: the measured seconds of a training step, a validation and a checkpoint write; the plan they
give (minutes an epoch, epochs that fit, predicted end); and under RUN_MINUTES when training steps must stop so
that the epoch's validation, its checkpoints and the predictions kept in reserve (RESERVE_PASSES) still fit.

train.py makes one RunClock a process (every process keeps time; under DDP they stop together, as train.py asks
them all) and engine.train_one_epoch tells it each step's seconds.
"""
import statistics
import time
from collections import deque

WARM_STEPS = 5           # first steps of a process not timed (kernels, allocator and loader workers warming up)
RECENT_STEPS = 500       # a step's seconds: the median of the last this many timed steps
PLAN_STEPS = 20          # timed steps before the first plan is printed
MARGIN = 1.5             # the budget keeps this many times the measured validation, save and reserve free
DISK_MB_PER_S = 100      # write speed a checkpoint's time is guessed at before one has been timed


def clock_time(t):
    return time.strftime("%H:%M", time.localtime(t))


def hours_minutes(seconds):
    seconds = max(seconds, 0)
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


class RunClock:
    """Times a run in this process from `start` (time.time() when train.py started).

    Args:
        cfg: the run's configuration (EPOCHS, RUN_MINUTES, MAX_MINUTES, RESERVE_PASSES).
        steps_per_epoch: training steps an epoch (this process's loader length).
        val_images: images validation predicts (0: none).
        val_passes: model passes a val image takes (test-time augmentation), to turn a val image's seconds into
            a pass's, which is what RESERVE_PASSES counts.
        start: time.time() when the process started (RUN_MINUTES counts from it).
        history: the run's metrics rows so far (a resumed run starts from its last measured validation).
        checkpoint_mb: megabytes an epoch's checkpoint writes take (last.pt and best.pt), for the guess at a save's
            seconds before one has been timed.
    """

    def __init__(self, cfg, steps_per_epoch, val_images, val_passes, start, history=(), checkpoint_mb=0.0):
        self.start, self.epochs = start, cfg["EPOCHS"]
        self.budget = cfg["RUN_MINUTES"] * 60
        self.reserve_passes = cfg["RESERVE_PASSES"]
        self.steps_per_epoch, self.val_images, self.val_passes = steps_per_epoch, val_images, max(val_passes, 1)
        self.steps, self.recent = 0, deque(maxlen=RECENT_STEPS)  # steps of this process; the latest timed ones
        self.warm = []  # seconds of the warm-up steps
        measured = [h for h in history if h.get("val_seconds") == h.get("val_seconds")]  # not NaN
        self.val_seconds = measured[-1].get("val_seconds") if measured else None
        self.image_seconds = measured[-1].get("val_seconds_per_image") if measured else None
        self.save_seconds, self.checkpoint_mb = None, checkpoint_mb

    # ---- what has been measured
    def step_done(self, seconds):
        """Record a step; True once, when enough steps were timed for the first plan."""
        self.steps += 1
        (self.warm if self.steps <= WARM_STEPS else self.recent).append(seconds)
        if self.steps <= WARM_STEPS or len(self.recent) <= 1:
            self._median = statistics.median(self.recent or self.warm)
        elif self.steps % 10 == 0:  # refreshed every 10 steps: must_stop asks it at every step
            self._median = statistics.median(self.recent)
        return self.steps == WARM_STEPS + PLAN_STEPS

    def step_seconds(self):
        """Median seconds of a warm step (None before any step; the warm-up steps where there are no others)."""
        return self._median if self.steps else None

    def validated(self, seconds, seconds_per_image):
        self.val_seconds, self.image_seconds = seconds, seconds_per_image

    def saved(self, seconds):
        self.save_seconds = seconds

    # ---- estimates
    def validation_estimate(self):
        """Seconds of one validation: measured, else val images x (1 + passes) steps (a guess), else 0."""
        if self.val_seconds is not None or not self.val_images:
            return self.val_seconds or 0.0
        step = self.step_seconds()
        return self.val_images * (1 + self.val_passes) * step if step else 0.0

    def save_estimate(self):
        return self.checkpoint_mb / DISK_MB_PER_S if self.save_seconds is None else self.save_seconds

    def reserve(self):
        """Seconds kept free for RESERVE_PASSES image passes after training, at the measured val seconds a pass
        (before a validation: a training step's, a guess) x MARGIN."""
        per_pass = self.image_seconds / self.val_passes if self.image_seconds is not None else self.step_seconds()
        return self.reserve_passes * (per_pass or 0.0) * MARGIN

    def epoch_estimate(self):
        """Seconds of a whole epoch: its steps, a validation and a checkpoint write (None before a step)."""
        step = self.step_seconds()
        return None if step is None else self.steps_per_epoch * step + self.validation_estimate() + self.save_estimate()

    # ---- the whole-run budget (RUN_MINUTES)
    def train_deadline(self):
        """The time.time() at which training steps stop under RUN_MINUTES (None: no budget): the run's end less
        the reserve and MARGIN x (a validation + a checkpoint write), which the epoch still needs."""
        if self.budget <= 0:
            return None
        return (self.start + self.budget - self.reserve()
                - MARGIN * (self.validation_estimate() + self.save_estimate()))

    def must_stop(self, now=None):
        """Under RUN_MINUTES: is it time to stop training steps?"""
        deadline = self.train_deadline()
        return deadline is not None and (now or time.time()) >= deadline

    def room_for_an_epoch(self, now=None):
        """Under RUN_MINUTES, at an epoch's start: is there time for at least a few steps (10) before the
        deadline? Without a budget, always."""
        deadline = self.train_deadline()
        if deadline is None:
            return True
        return deadline - (now or time.time()) > 10 * (self.step_seconds() or 0.0)

    def epochs_that_fit(self, now=None):
        """Whole epochs that fit what is left of RUN_MINUTES (None: no budget or nothing timed yet)."""
        epoch, deadline = self.epoch_estimate(), self.train_deadline()
        if deadline is None or not epoch:
            return None
        left = deadline - (now or time.time()) + MARGIN * (self.validation_estimate() + self.save_estimate())
        return max(int(left // epoch), 0)

    def predicted_end(self, epochs_done, now):
        """(epochs still to train: EPOCHS' left, cut to those that fit RUN_MINUTES; the time.time() training ends
        at, never past the budget less the reserve). Needs a timed step."""
        left = max(self.epochs - epochs_done, 0)
        fit = self.epochs_that_fit(now)
        todo = left if fit is None else min(left, fit)
        ends = now + todo * self.epoch_estimate()
        if self.budget > 0:
            ends = min(ends, self.start + self.budget - self.reserve())
        return todo, ends

    # ---- what the log says
    def plan(self, epochs_done, now=None):
        """The plan as a few lines of text: seconds a step, minutes an epoch, epochs that fit, predicted end."""
        now = now or time.time()
        step = self.step_seconds()
        if step is None:
            return "plan: no step timed yet"
        timed = len(self.recent) or len(self.warm)
        val = (f"validation {hours_minutes(self.val_seconds)} ({self.image_seconds:.2f} s to predict a val image)"
               if self.val_seconds is not None else
               f"validation not timed yet (guessed at {hours_minutes(self.validation_estimate())})")
        lines = [f"plan: {step:.2f} s a step (median of {timed} steps), {self.steps_per_epoch} steps "
                 f"an epoch = {hours_minutes(self.steps_per_epoch * step)} of training; {val}; checkpoint "
                 + (f"{self.save_seconds:.0f} s" if self.save_seconds is not None else "not timed yet")
                 + f"; an epoch {hours_minutes(self.epoch_estimate())}"]
        left = max(self.epochs - epochs_done, 0)
        if not left:
            return "\n".join(lines)  # the run's last epoch: nothing more to plan
        todo, ends = self.predicted_end(epochs_done, now)
        if self.budget > 0:
            lines.append(f"plan: RUN_MINUTES {self.budget / 60:g} ({hours_minutes(self.start + self.budget - now)} "
                         f"left, {hours_minutes(self.reserve())} of it kept for {self.reserve_passes} prediction "
                         f"passes after training): {todo} of the {left} epochs to go fit")
        lines.append(f"plan: {todo} more epoch(s) (EPOCHS {self.epochs}; early stopping may end sooner): training "
                     f"ends about {clock_time(ends)} (in {hours_minutes(ends - now)})")
        return "\n".join(lines)

    def eta(self, epochs_done, now=None):
        """'elapsed X, ETA Y' of an epoch line: the time since the start, and the predicted end of training."""
        now = now or time.time()
        text = f"elapsed {hours_minutes(now - self.start)}"
        if self.epoch_estimate() is None:
            return text
        _, ends = self.predicted_end(epochs_done, now)
        return text + f", ETA {clock_time(ends)} ({hours_minutes(ends - now)})"
