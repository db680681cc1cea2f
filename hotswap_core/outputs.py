"""What a step's forwards do to their rows (vLLM's ``update_from_output``, SGLang's output processing): a prompt's
chunk noted (and scored, when asked), a whole prompt shared with the request's other choices, each row's token
pushed, finished rows retired and failed ones ended, their cache rows and slot pins freed for the next step.

Runs on the engine's worker thread, between its forwards (``Engine._step``).
"""

from __future__ import annotations

import logging
import time

from hotswap_core.errors import EngineError
from hotswap_core.generation import GenerationResult, Scored
from hotswap_core.runner import ModelRunner, StepOutput
from hotswap_core.sampling import logprobs, sample
from hotswap_core.scheduler import Row, RowTable
from hotswap_core.slots import SlotBank

log = logging.getLogger("hotswapd.engine")


class OutputProcessor:
    """Applies forwards' outputs to the rows of ``table``; ``slots`` holds their pins, ``runner`` the KV cache."""

    def __init__(self, table: RowTable, slots: SlotBank, runner: ModelRunner) -> None:
        self.table, self.slots, self.runner = table, slots, runner

    def cancelled_prefilling(self, row: Row) -> bool:
        """A row whose client went away while its prompt was prefilling ends here, as cancelled."""
        if not row.state.request.cancelled.is_set():
            return False
        row.state.finish_reason = "cancelled"
        self.retire(row)
        return True

    def prefilled(self, rows: list[Row], out: StepOutput, ends: list[int]) -> set[int]:
        """After a chunk of each row's prompt ran (to ``ends``): score it for the rows that ask
        (``runner.score_prompt``: the head over the chunk's hidden states; once for rows with the same prompt,
        chunk, slot and alternatives, as a request's ``n`` choices), note how far each prompt is in the cache, and
        tell each row whose prompt is now whole that it ran, before its first token (and share it with the rows
        that wait for it). A row whose client went away is not scored. Returns the rows (indices into ``rows``)
        whose scoring failed: they fail alone."""
        failed: set[int] = set()
        done: dict[tuple[tuple[int, ...], int, int, int], tuple[Scored, ...]] = {}
        for i, (row, end) in enumerate(zip(rows, ends, strict=True)):
            top = row.state.params.prompt_logprobs
            if top is not None and not row.state.request.cancelled.is_set():
                assert out.hidden is not None
                key = (tuple(row.state.prompt_ids), row.slot, top, row.filled)
                try:
                    scored = done.get(key) or self.runner.score_prompt(row, out.hidden[i], top, row.filled, end)
                    done[key] = scored
                    row.scored += scored
                except Exception as exc:
                    log.exception("scoring a prompt of %d tokens failed", len(row.state.prompt_ids))
                    self.fail([row], exc)
                    failed.add(i)
                    continue
            row.filled = end
            if not row.prefilling:
                asked = top is not None and not row.state.request.cancelled.is_set()
                row.state.prefilled(tuple(row.scored) if asked else None)
                if row.followers:
                    self.share(row)
        return failed

    def share(self, leader: Row) -> None:
        """``leader``'s prompt is in the cache: its followers (``share_prompts``) copy all of it but the last position,
        whose chunk each prefills itself at the next step (its own logits and first draw)."""
        followers, leader.followers = leader.followers, []
        copied = len(leader.state.prompt_ids) - 1
        self.runner.cache.copy_prefix(leader.index, [f.index for f in followers], copied)
        for follower in followers:
            follower.filled, follower.leader = copied, None

    def sample(self, rows: list[Row], out: StepOutput, numbers: list[float], failed: set[int]) -> None:
        """Push each row's token (drawn in the forward, or here when the row filters), then retire the finished;
        ``failed``: rows (indices into ``rows``) already ended, skipped."""
        for i, row in enumerate(rows):
            row.finite = row.finite and out.finite[i]
            if row.capture and row.logits is None:
                row.logits = out.logits[out.at[i]].float().cpu()
        states = [r.state for r in rows]
        tokens = sample(out.logits, states, numbers, out.tokens, out.at)
        asking = [i for i, row in enumerate(rows) if row.state.params.logprobs is not None and i not in failed]
        scored: dict[int, Scored] = {}
        if asking:
            try:
                top = [rows[i].state.params.logprobs or 0 for i in asking]
                found = logprobs(out.logits, [out.at[i] for i in asking], [tokens[i] for i in asking], top)
                scored = dict(zip(asking, found, strict=True))
            except Exception as exc:  # fails the rows that asked, never the step's others
                log.exception("log-probabilities over %d rows failed", len(asking))
                self.fail([rows[i] for i in asking], exc)
                failed = failed | set(asking)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if i in failed:
                continue
            row.state.push(token, scored.get(i))
            if row.state.done:
                self.retire(row)

    def fail(self, rows: list[Row], exc: Exception) -> None:
        """End ``rows`` with ``exc``: their requests fail, their cache rows and slot pins are free."""
        for row in rows:
            if self.table.rows[row.index] is row:
                self.table.retire(row)
                self.slots.unpin(row.slot)
            if not row.state.request.future.done():
                row.state.request.future.set_exception(EngineError(f"generation failed: {exc}"))

    def retire(self, row: Row) -> None:
        """The row's request is answered now, the step it finished, and its row is free for the next step."""
        self.table.retire(row)
        self.slots.unpin(row.slot)
        state = row.state
        ttft = (state.first_token_at or row.started_at) - state.request.created_at
        state.request.future.set_result(
            GenerationResult(
                text=state.text,
                token_ids=tuple(state.ids),
                prompt_tokens=len(state.prompt_ids),
                finish_reason=state.finish_reason or "length",
                adapter=row.version,
                time_to_first_token_s=ttft,
                duration_s=time.monotonic() - state.request.created_at,
                logprobs=None if state.logprobs is None else tuple(state.logprobs),
                prompt_logprobs=state.prompt_logprobs,
                queue_time_s=row.started_at - state.request.created_at,
            )
        )
