"""LLMEngine: add requests, step (schedule -> run -> sample -> finish), abort. Synchronous; one thread owns it."""

import itertools
import logging
import math
import time
from dataclasses import replace
from typing import Any

import torch

from engine_builder.common.types import (
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from engine_builder.engine import grammar_masks
from engine_builder.engine.block_manager import BlockManager
from engine_builder.engine.config import EngineConfig, SchedulerPolicy
from engine_builder.engine.grammar_masks import GrammarMasks
from engine_builder.engine.host_to_device import index_tensor
from engine_builder.engine.layers.sampler import SamplingRow, make_sampler
from engine_builder.engine.lookahead import DraftPlan, GrammarTooSlowError
from engine_builder.engine.model_runner import ModelRunner
from engine_builder.engine.parallel import RankFailedError
from engine_builder.engine.scheduler import ScheduledSequence, Scheduler
from engine_builder.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from engine_builder.engine.speculation import LookaheadRunner

logger = logging.getLogger(__name__)


class RequestRejectedError(ValueError):
    """The request cannot run on this engine (too long, bad token ids); nothing was scheduled."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param = param
        self.code = code  # the error code the server's 400 carries


def _too_slow_message(seconds: float) -> str:
    return (
        f"the request's grammar (response_format or strict tools) took {seconds:.1f} s to constrain one token, past "
        f"the {grammar_masks.MASK_FILL_BUDGET_S:g} s limit, and grows slower with every token: simplify it. An ambiguous grammar "
        "(a rule that matches the same text in more than one way, such as `r ::= r r`) does this; write each "
        "repetition one way (`r ::= [a-z]+`)"
    )


def _wants_prompt_logprobs(item: ScheduledSequence) -> bool:
    seq = item.seq
    already = len(seq.prompt_logprobs) if seq.prompt_logprobs is not None else 0  # recompute after preemption
    return (
        seq.sampling.prompt_logprobs is not None
        and seq.num_computed_tokens < seq.num_prompt_tokens - 1
        and already < seq.num_prompt_tokens
    )


class LLMEngine:
    def __init__(self, config: EngineConfig, eos_token_ids: tuple[int, ...]) -> None:
        self.eos_token_ids = eos_token_ids
        self.runner = ModelRunner(config)
        config = self.config = self.runner.config  # as resolved for the device (lookahead's draft sizes)
        spec = self.runner.model.spec
        self.vocab_size = spec.vocab_size
        self.max_model_len = min(config.max_seq_len, spec.max_position_embeddings)
        if not config.enable_chunked_prefill and config.max_num_tokens < self.max_model_len - 1:
            # said once at start: otherwise the first long prompt is where an operator learns of the limit
            logger.warning(
                "chunked prefill is off and max_num_tokens is %d, below max_seq_len %d: prompts longer than %d "
                "tokens will be refused",
                config.max_num_tokens, self.max_model_len, config.max_num_tokens,
            )
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.sampler = make_sampler(spec.vocab_size, self.runner.device)
        self.lookahead = (
            LookaheadRunner(config.lookahead, config.max_batch_size, self.blocks, self.runner.kv_cache)
            if config.lookahead is not None
            else None
        )
        self.groups: dict[str, SequenceGroup] = {}
        self._guided: set[str] = set()  # requests with a grammar: without any, a step starts no mask fills
        # pool slot of each LoRA adapter, in the config's order (slot 0 is the base model)
        self.lora_slots = {adapter.name: slot for slot, adapter in enumerate(config.lora_adapters, start=1)}
        self._seq_ids = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.masks = GrammarMasks()

    def close(self) -> None:
        """Release what outlives the object: the other tensor-parallel ranks (on the thread that steps)."""
        self.runner.close()

    # -- requests ----------------------------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        """Refuse (RequestRejectedError) a request this engine could never run: a prompt it cannot take, an adapter
        it does not serve, or more KV than the pool holds. The input side calls this once, before `add_request`."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise RequestRejectedError("the prompt is empty", code="empty_prompt")
        if len(prompt) >= self.max_model_len:
            raise RequestRejectedError(
                f"the prompt has {len(prompt)} tokens; this engine's max_seq_len is {self.max_model_len}",
                code="context_length_exceeded",
            )
        if not self.config.enable_chunked_prefill and len(prompt) > self.config.max_num_tokens:
            raise RequestRejectedError(
                f"the prompt has {len(prompt)} tokens, more than max_num_tokens {self.config.max_num_tokens}, and "
                "chunked prefill is off (`enable_chunked_context` under inference_stack v1, `enable_chunked_prefill` "
                "under v2): turn it on, or raise max_num_tokens",
                code="request_too_large",
            )
        if max(prompt) >= self.vocab_size or min(prompt) < 0:
            raise RequestRejectedError(f"prompt token ids must be in [0, {self.vocab_size})")
        if request.sampling.n > self.config.max_batch_size:  # its choices run together: it would wait for ever
            raise RequestRejectedError(
                f"n={request.sampling.n} choices run together, more than max_batch_size {self.config.max_batch_size}",
                code="request_too_large",
            )
        if request.adapter is not None and request.adapter not in self.lora_slots:
            raise RequestRejectedError(f"this engine serves no LoRA adapter named {request.adapter!r}")
        self._check_capacity(request)

    def add_request(self, request: GenerationRequest, guide_matchers: list[Any] | None = None) -> None:
        """Queue a request `check_request` accepted. `guide_matchers` (one per choice) constrain decoding to a
        grammar. Only what depends on the engine's state now (a request id already running) is checked here."""
        prompt = list(request.prompt_token_ids)
        params = self._fitting_sampling(request)
        assert prompt, "check_request first"
        if request.request_id in self.groups:
            raise RequestRejectedError(f"request id {request.request_id} is already running")
        lora_slot = 0
        if request.adapter is not None:
            lora_slot = self.lora_slots.get(request.adapter, 0)
            if not lora_slot:
                raise RequestRejectedError(f"this engine serves no LoRA adapter named {request.adapter!r}")
        arrival = request.arrival_time or time.monotonic()
        sequences = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=request.request_id,
                index=index,
                prompt_token_ids=prompt,
                sampling=params,
                arrival_time=arrival,
                generator=self._generator(params.seed, index),
                lora_slot=lora_slot,
            )
            for index in range(params.n)
        ]
        if guide_matchers is not None:
            if len(guide_matchers) != params.n:
                raise RequestRejectedError("one grammar matcher per choice is required")
            if params.ignore_eos:  # the grammar ends the output: past its end a matcher has no mask to give, and the
                # failed fill stopped the engine loop with every request in it (probe GF; the server refuses it first)
                raise RequestRejectedError("ignore_eos cannot be combined with a grammar", param="ignore_eos")
            for seq, matcher in zip(sequences, guide_matchers, strict=True):
                seq.guide_state = matcher
            self._guided.add(request.request_id)
        group = SequenceGroup(request.request_id, sequences, arrival)
        self.groups[request.request_id] = group
        self.scheduler.add(group)

    def _shared_prompt_blocks(self, request: GenerationRequest) -> int:
        """The prompt's full blocks a request's choices hold once between them: forked from the parent, and after a
        preemption again through the prefix cache, which max_utilization needs on (without it, each recomputed
        choice holds its own copy)."""
        policy = self.config.scheduler_policy
        shares_again = self.blocks.enable_prefix_caching or policy != SchedulerPolicy.MAX_UTILIZATION
        return len(request.prompt_token_ids) // self.blocks.block_size if shares_again else 0

    def _fitting_sampling(self, request: GenerationRequest) -> SamplingParams:
        """The request's sampling, with a default max_tokens (the client sent none: the rest of the context) lowered
        to what the KV pool holds for its n choices together. Refusing it told a client to lower a max_tokens it
        never sent (probe CD: n=3 without max_tokens was a 400 where max_tokens=100 ran)."""
        params = request.sampling
        if not params.max_tokens_default or params.n == 1:
            return params
        block_size = self.blocks.block_size
        shared = self._shared_prompt_blocks(request)
        # n choices of P blocks each hold n * P - (n - 1) * shared blocks: the largest P that fits the pool
        per_choice = (self.blocks.num_usable_blocks + (params.n - 1) * shared) // params.n
        fitting = min(per_choice * block_size, self.max_model_len) - len(request.prompt_token_ids)
        # below min_tokens it could not honour that field (probe CZ): the request is refused as too large instead
        lowered = max(params.min_tokens, 1) <= fitting < params.max_tokens
        return replace(params, max_tokens=fitting) if lowered else params

    def _check_capacity(self, request: GenerationRequest) -> None:
        """Refuse what the KV pool could never hold: queued, it would wait forever and block the queue behind it.
        Lookahead drafts are not counted: they only take blocks nothing else has a claim on (Scheduler.schedule)."""
        params = self._fitting_sampling(request)
        block_size = self.blocks.block_size
        longest = min(len(request.prompt_token_ids) + params.max_tokens, self.max_model_len)
        per_choice = -(-longest // block_size)
        shared = self._shared_prompt_blocks(request)
        # Under either policy a request's choices run together and are preempted together: all of them at their
        # longest must fit at once, or under max_utilization the request would preempt itself for ever (probe AC:
        # n=2 with a prompt filling the pool left no block for the second choice's copy of its last one).
        needed = per_choice + (params.n - 1) * max(per_choice - shared, 0)
        available = self.blocks.num_usable_blocks
        if needed > available:
            capacity = available * block_size
            raise RequestRejectedError(
                f"The KV cache holds {capacity} tokens; this request needs up to {needed * block_size} "
                f"({params.n} choice(s) of up to {longest} tokens). Lower n or max_tokens.",
                param="n" if params.n > 1 else "max_tokens",
                code="request_too_large",
            )

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        """The choice's own random stream: always on the CPU; on a GPU only for seeded requests (the others share
        the device's default generator, so the sampler draws their noise in one batched call)."""
        device = self.runner.device
        if device.type != "cpu" and seed is None:
            return None
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed + index)
        return generator

    def abort(
        self, request_id: str, reason: FinishReason = FinishReason.ABORT, error: str | None = None,
        error_param: str | None = None,
    ) -> list[GenerationDelta]:  # fmt: skip
        """End a request. An `error_param` says the request's own field is at fault (a 400 naming it), not the engine."""
        group = self._forget(request_id)
        if group is None:
            return []
        self.scheduler.remove(request_id)
        outputs = []
        for seq in group.sequences:
            if seq.is_finished:
                continue
            self._finish(seq, reason, None)
            seq.error = error
            seq.error_param = error_param
            outputs.append(self._output(seq, [], None))
        return outputs

    def _end_too_slow_grammar(self, request_id: str, seconds: float) -> list[GenerationDelta]:
        """A grammar too slow to enforce is the request's fault, as one too slow to compile is: a 400 naming its field
        (`response_format`, `tools`), which clients do not retry; it was a 500 the openai SDK sent twice more, each
        try slowing every other request (probe GA)."""
        logger.warning("request %s: its grammar took %.1f s to constrain one token; ending it", request_id, seconds)
        group = self.groups.get(request_id)
        guide = group.parent.sampling.guide if group is not None else None
        param = guide.param if guide is not None else "response_format"
        return self.abort(request_id, FinishReason.ERROR, _too_slow_message(seconds), error_param=param)

    def abort_choice(self, request_id: str, index: int) -> list[GenerationDelta]:
        """End one choice (a stop string matched in the server's output side); the request ends with its last
        choice. Nothing is output for it: the server already ended the choice."""
        group = self.groups.get(request_id)
        if group is None:
            return []
        seq = group.sequences[index]
        if not seq.is_finished:
            self._finish(seq, FinishReason.STOP, None)
            self.blocks.free(seq)
        if group.is_finished:
            self.scheduler.finish(group)
            self._forget(request_id)
        return []

    def _forget(self, request_id: str) -> SequenceGroup | None:
        """The request's group out of the engine's books (its own, and the set of requests with a grammar)."""
        self._guided.discard(request_id)
        return self.groups.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ----------------------------------------------------------------------------------------
    def step(self) -> list[GenerationDelta]:
        drafts = self._plan_drafts()
        # KV slots for the accepted candidate tokens: as many as the longest candidate
        schedule = self.scheduler.schedule(
            {seq_id: (plan.num_rows, max(map(len, plan.candidates), default=0)) for seq_id, plan in drafts.items()}
        )
        for seq in schedule.preempted:  # its penalties' history is rebuilt when it samples again, not held meanwhile
            self.sampler.free(seq.seq_id)
        if schedule.is_empty:
            return []
        self.num_steps += 1
        scheduled = schedule.scheduled
        requests: list[tuple[int, int]] = []  # (scheduled index, row offset) for each logits row computed
        prompt_rows: dict[int, list[int]] = {}  # scheduled index -> rows of prompt positions (prompt logprobs)
        for index, item in enumerate(scheduled):
            if item.num_draft_tokens:
                item.draft = drafts[item.seq.seq_id]
                requests.extend((index, offset) for offset in self.lookahead.logit_offsets(item.draft))  # type: ignore[union-attr]
                continue
            if item.sample:
                requests.append((index, item.num_new_tokens - 1))
            if _wants_prompt_logprobs(item):
                prompt_rows[index] = list(range(len(requests), len(requests) + item.num_new_tokens))
                requests.extend((index, offset) for offset in range(item.num_new_tokens))
        failures: list[GenerationDelta] = []
        self._start_mask_fill(scheduled)
        try:
            hidden = self.runner.execute(self.runner.prepare(scheduled, requests))
        except RankFailedError:  # the tensor-parallel group is broken: nothing can run any more
            raise
        except Exception:  # find the request(s) at fault; the others go on
            logger.exception("forward pass failed; retrying its %d sequences one by one", len(scheduled))
            hidden, failed = self._execute_one_by_one(scheduled, requests)
            for request_id in failed:
                failures.extend(self.abort(request_id, FinishReason.ERROR, failed[request_id]))
            keep = [i for i, item in enumerate(scheduled) if item.seq.request_id not in failed]
            rows = [row for row, (index, _) in enumerate(requests) if index in keep]
            hidden = hidden[torch.tensor(rows, dtype=torch.long)] if rows else hidden[:0]
            renumber = {old_index: new_index for new_index, old_index in enumerate(keep)}
            requests = [(renumber[index], offset) for index, offset in requests if index in renumber]
            prompt_rows = {renumber[i]: [rows.index(r) for r in v] for i, v in prompt_rows.items() if i in renumber}
            scheduled = [scheduled[i] for i in keep]
        rows_of: dict[int, list[int]] = {}
        for row, (index, _) in enumerate(requests):
            rows_of.setdefault(index, []).append(row)
        for index, rows in prompt_rows.items():
            self._record_prompt_logprobs(scheduled[index], hidden[torch.tensor(rows)])
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if not item.num_draft_tokens:
                self.blocks.commit_full_blocks(item.seq)
        outputs = failures + self._sample(scheduled, rows_of, hidden)
        outputs += self._finish_drafts(scheduled, rows_of, hidden)
        self._release_finished(outputs)
        # Forks happen only in this step's sampling: a hold a request ended before (a grammar too slow, a failed
        # forward) was given back only by the next schedule, so an idle server reported KV in use (probe BE #3).
        self.blocks.release_held()
        self.num_generated_tokens += sum(len(output.token_ids) for output in outputs)
        return outputs

    def _sample(self, scheduled: list[ScheduledSequence], rows_of: dict[int, list[int]], hidden: torch.Tensor) -> list[GenerationDelta]:
        outputs: list[GenerationDelta] = []
        for request_id, seconds in self.masks.collect().items():
            outputs.extend(self._end_too_slow_grammar(request_id, seconds))
        sampled_items = [
            (index, item)
            for index, item in enumerate(scheduled)
            if item.sample and not item.num_draft_tokens and item.seq.request_id in self.groups
        ]
        rows, owners = self._sampling_rows([item for _, item in sampled_items])
        if not rows:
            return outputs
        logit_rows = [rows_of[sampled_items[position][0]][0] for position, _ in owners]
        row_logits = self._project_rows(hidden, logit_rows)
        try:
            sampled = self.sampler(row_logits, rows)
            picks = list(zip(owners, sampled.token_ids, sampled.logprobs, strict=True))
        except Exception:  # one request's sampling (its grammar, its parameters) must not fail the batch
            logger.exception("sampling failed; retrying its %d rows one by one", len(rows))
            picks = []
            for position, (row, owner) in enumerate(zip(rows, owners, strict=True)):
                try:
                    one = self.sampler(row_logits[position : position + 1], [row])
                except Exception as error:
                    outputs.extend(self.abort(owner[1].request_id, FinishReason.ERROR, f"sampling failed: {error}"))
                    continue
                picks.append((owner, one.token_ids[0], one.logprobs[0]))
        for (_, seq), token_id, logprob in picks:
            if seq.request_id not in self.groups:
                continue  # aborted above
            self._append(seq, token_id)
            outputs.append(self._output(seq, [token_id], [logprob] if logprob is not None else None))
        return outputs

    def _project_rows(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Logits of hidden rows `rows`, one projection per distinct row (forked choices share their parent's).

        The usual decode step asks for every row once, in order: then nothing is gathered, so no index tensor
        has to reach the device (a synchronous copy that would wait for the forward pass)."""
        if rows == list(range(hidden.shape[0])):
            return self.runner.logits(hidden)
        distinct = sorted(set(rows))
        position = {row: index for index, row in enumerate(distinct)}
        projected = self.runner.logits(hidden[index_tensor(distinct, hidden.device)])
        if len(distinct) == len(rows) and rows == distinct:
            return projected
        return projected[index_tensor([position[row] for row in rows], hidden.device)]

    def _execute_one_by_one(
        self, scheduled: list[ScheduledSequence], requests: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, dict[str, str]]:
        """Hidden rows in `requests` order, from one forward pass per sequence; and the requests that failed."""
        pieces: list[torch.Tensor] = []
        failed: dict[str, str] = {}
        width, dtype = None, torch.float32
        for index, item in enumerate(scheduled):
            own = [(0, offset) for i, offset in requests if i == index]
            try:
                piece = self.runner.execute(self.runner.prepare([item], own)).clone()  # graph outputs are reused
                width, dtype = piece.shape[-1], piece.dtype
            except Exception as error:
                failed[item.seq.request_id] = f"engine error: {error}"
                piece = None
            pieces.append(piece if piece is not None else torch.empty(0))
        if width is None:
            return torch.empty(0, 0), failed
        filled = [
            piece
            if piece.numel()
            else torch.zeros(sum(1 for i, _ in requests if i == index), width, dtype=dtype, device=self.runner.device)
            for index, piece in enumerate(pieces)
        ]
        return torch.cat(filled), failed

    def _record_prompt_logprobs(self, item: ScheduledSequence, hidden: torch.Tensor) -> None:
        """Logprobs of the prompt's own tokens (echo with logprobs): row k predicts the token after it."""
        seq = item.seq
        top = seq.sampling.prompt_logprobs or 0
        logprobs = torch.log_softmax(self.runner.host_logits(hidden), dim=-1)
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        start = seq.num_computed_tokens
        for offset in range(item.num_new_tokens):
            target = start + offset + 1
            if target >= seq.num_prompt_tokens:
                break
            if target < len(seq.prompt_logprobs):  # recorded before a preemption dropped this chunk's KV (probe AC)
                continue
            token = seq.prompt_token_ids[target]
            row = logprobs[offset]
            alternatives: tuple[tuple[int, float], ...] = ()
            if top:
                values, ids = row.topk(top)
                alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            seq.prompt_logprobs.append(TokenLogprob(token, float(row[token]), alternatives))

    def _plan_drafts(self) -> dict[int, DraftPlan]:
        if self.lookahead is None:
            return {}
        running = [seq for group in self.scheduler.running for seq in group.sequences if seq.status == SequenceStatus.RUNNING and not seq.is_finished]
        return self.lookahead.plan(running, len(running), self.max_model_len)

    def _finish_drafts(self, scheduled: list[ScheduledSequence], rows_of: dict[int, list[int]], hidden: torch.Tensor) -> list[GenerationDelta]:
        outputs: list[GenerationDelta] = []
        # none, or aborted this step
        drafted = [index for index, item in enumerate(scheduled) if item.num_draft_tokens and item.seq.request_id in self.groups]
        if not drafted:
            return outputs
        assert self.lookahead is not None
        # every drafting sequence's rows through the LM head and to the host at once (one copy a step, not one each)
        logits = self.runner.host_logits(hidden[index_tensor([row for index in drafted for row in rows_of[index]], hidden.device)])
        first_row = 0
        for index in drafted:
            item = scheduled[index]
            seq = item.seq
            rows = logits[first_row : first_row + len(rows_of[index])]
            first_row += len(rows_of[index])
            if seq.request_id not in self.groups:  # another choice's grammar ended the request in this loop
                continue
            try:
                result = self.lookahead.finish(seq, item.draft, rows)
            except GrammarTooSlowError as slow:
                outputs.extend(self._end_too_slow_grammar(seq.request_id, slow.seconds))
                continue
            appended: list[int] = []
            for token in result.tokens:
                self._append(seq, token)
                appended.append(token)
                if seq.is_finished:
                    break
            # the runner counted every accepted token; those past max_tokens or a stop token were never output
            self.lookahead.num_accepted -= len(result.tokens) - len(appended)
            reused = min(result.num_reused, len(appended) - 1)
            # a request that ended in this step too: its accepted tokens' KV and full blocks reach the prefix cache
            # before its blocks are freed, as a plain step's do (the next chat turn found a block less, probe FC)
            self.lookahead.copy_accepted(seq, result, item.draft, reused)
            seq.num_computed_tokens += reused
            self.blocks.commit_full_blocks(seq)
            outputs.append(self._output(seq, appended, None))
        return outputs

    def _release_finished(self, outputs: list[GenerationDelta]) -> None:
        for request_id in {output.request_id for output in outputs if output.finish_reason is not None}:
            group = self.groups.get(request_id)
            if group is None:
                continue
            for seq in group.sequences:
                if seq.is_finished and seq.block_table:
                    self.blocks.free(seq)
            if group.is_finished:
                self.scheduler.finish(group)
                self._forget(request_id)

    def _sampling_rows(
        self, items: list[ScheduledSequence]
    ) -> tuple[list[SamplingRow], list[tuple[int, Sequence]]]:
        """One row per sampled sequence; a parent finishing its prefill also samples for its forked choices."""
        rows: list[SamplingRow] = []
        owners: list[tuple[int, Sequence]] = []
        for position, item in enumerate(items):
            seq = item.seq
            targets = [seq]
            group = self.groups[seq.request_id]
            if seq is group.parent and not seq.output_token_ids and len(group.sequences) > 1:
                targets += self._fork_children(group)
            for target in targets:
                rows.append(
                    SamplingRow(
                        params=target.sampling,
                        generator=target.generator,
                        prompt_token_ids=target.prompt_token_ids,
                        output_token_ids=target.output_token_ids,
                        eos_token_ids=self.eos_token_ids,
                        token_bitmask=self.masks.mask_of(target),
                        seq_id=target.seq_id,
                    )
                )
                owners.append((position, target))
        return rows, owners

    def _start_mask_fill(self, scheduled: list[ScheduledSequence]) -> None:
        """Fill the grammar masks of this step's sampled rows on a helper thread while the forward runs.

        The matchers already hold the state after the last accepted token, and the forward releases the GIL
        inside its kernels, so on a machine with a spare core the masks cost (almost) nothing; `_sample` collects
        them, ending a request whose fill runs past the budget.
        """
        if not self._guided:  # the walk below costs ~0.26 us a row (probe ED), for nothing without a grammar
            self.masks.start([])
            return
        guided = [
            seq
            for item in scheduled
            if item.sample and not item.num_draft_tokens
            for seq in ([item.seq] + self._unforked_children(item.seq))
            if seq.guide_state is not None
        ]
        self.masks.start(guided)

    def _unforked_children(self, seq: Sequence) -> list[Sequence]:
        group = self.groups.get(seq.request_id)
        if group is None or seq is not group.parent or seq.output_token_ids:
            return []
        return [child for child in group.children if not child.is_finished and not child.output_token_ids]

    def _fork_children(self, group: SequenceGroup) -> list[Sequence]:
        forked = []
        for child in group.children:
            if child.is_finished or child.output_token_ids:
                continue
            copy = self.blocks.fork(group.parent, child)
            if copy is not None:
                self.runner.kv_cache.copy_block(*copy)
            child.status = SequenceStatus.RUNNING
            child.num_cached_prompt_tokens = group.parent.num_cached_prompt_tokens
            if group.parent.prompt_logprobs is not None:  # the prompt is the parent's: so are its logprobs (echo)
                child.prompt_logprobs = list(group.parent.prompt_logprobs)
            forked.append(child)
        return forked

    def _append(self, seq: Sequence, token_id: int) -> None:
        seq.output_token_ids.append(token_id)
        params = seq.sampling
        if seq.guide_state is not None and not seq.guide_state.accept(token_id):
            self._finish(seq, FinishReason.ERROR, None)
            if bans_leave_no_token(seq.guide_state, params):
                # The request's bans took every token the grammar allows here: the sampler had none left to draw.
                seq.error = (
                    f"bad_token_ids bans every token the structured output allows after {seq.num_output_tokens - 1} "
                    "generated tokens; ban fewer tokens"
                )
                seq.error_param = "bad_token_ids"
            else:  # the mask only offers tokens the grammar accepts: the matcher and the mask disagree
                seq.error = f"token {token_id} was rejected by the grammar"
            return
        num_output = seq.num_output_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self._finish(seq, FinishReason.STOP, None)
                return
            if token_id in params.stop_token_ids:
                self._finish(seq, FinishReason.STOP, token_id)
                return
        if num_output >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH, None)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.sampler.free(seq.seq_id)

    def _output(self, seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> GenerationDelta:
        first = token_ids and seq.num_output_tokens == len(token_ids)
        prompt_logprobs = seq.prompt_logprobs
        if first and prompt_logprobs is None and seq.sampling.prompt_logprobs is not None:
            prompt_logprobs = [None]  # a one-token prompt: no forward row predicts it, its entry is still null
        return GenerationDelta(
            prompt_logprobs=prompt_logprobs if first else None,
            request_id=seq.request_id,
            index=seq.index,
            token_ids=token_ids,
            text="",  # the client detokenizes
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
            error=seq.error,
            error_param=seq.error_param,
            queue_time_s=(
                seq.first_scheduled_time - seq.arrival_time
                if first and seq.first_scheduled_time is not None
                else None
            ),
        )

    def reset_counters(self) -> None:
        """Zero the totals /metrics exports since start (the server's warm-up request is not traffic)."""
        self.scheduler.num_preemptions = 0
        self.blocks.num_prefix_queries = self.blocks.num_prefix_hits = 0
        if self.lookahead is not None:
            self.lookahead.num_steps = self.lookahead.num_accepted = 0

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.blocks.usage,
            num_kv_blocks=self.blocks.num_usable_blocks,
            num_free_kv_blocks=self.blocks.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_prefix_cache_queries=self.blocks.num_prefix_queries,
            num_prefix_cache_hits=self.blocks.num_prefix_hits,
            num_lookahead_drafts=self.lookahead.num_steps if self.lookahead else 0,
            num_lookahead_accepted_tokens=self.lookahead.num_accepted_draft_tokens if self.lookahead else 0,
        )


def banned_tokens(params: SamplingParams) -> list[int]:
    """The request's banned tokens: bad_token_ids, a bias of -inf."""
    return [token for token, bias in params.logit_bias.items() if math.isinf(bias) and bias < 0]


def bans_leave_no_token(guide_state: Any, params: SamplingParams) -> bool:
    """Whether the request's banned tokens cover every token the grammar allows now: then the sampler could draw only
    a token the grammar rejects, and the request, not the engine, is at fault."""
    banned = banned_tokens(params)
    if not banned:
        return False
    allowed = guide_state.allowed_tokens().clone()
    allowed[banned] = False
    return not bool(allowed.any())
