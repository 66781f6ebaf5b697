"""The token mask of a constrained reply: llguidance's matcher over the whole turn, one per sequence.

The scheduler (scheduler.py) asks for the next mask on its mask thread, with the token just sampled,
while its own thread queues the forward step that token feeds (which does not need the mask; only the
next sampling does), so the host work here overlaps the model's and the host's queuing of it. A mask is
llguidance's bitmask (a numpy copy: int32 words, bit i allows token i), applied to the logits inside
the sequence's sampler (generation.py `masked`).

Fitting max_tokens: a constrained answer cut off by the token limit would be invalid JSON, and a
model (a random one at worst) may never want to close its strings. So the processor keeps a closing
path in view: the fewest tokens it finds that end the turn from where it is (`<|end|>`, the final
header, the shortest JSON the schema allows, `<|return|>`). When the tokens left come within a few
of that path, the path is forced: strings end, arrays stop at minItems, optional fields are left out,
and the reply ends properly. If even that does not fit (a very small max_tokens), nothing is forced
and the reply ends by length (finish_reason "length", never a claim of completion).

The closing path is searched, not derived: llguidance gives no shortest completion. One walk from
the current state, on a copy of the matcher, takes forced tokens, else the first allowed of: the end
tokens, then `"` inside a string, or outside one `}` `]` `,` `:` `0` `"` `[` `{` and the first letters of
null / false / true and `-` (closers first: they end things). Where none is allowed (inside a pattern
or a format), or one would come a third time in a row (`0.000...`), it takes the first printable
byte after which the state allows something new (states are told apart by the bytes they allow
next, probed on a few bytes of each class), so an email becomes `!@0` rather than `aaaa...`; else
any allowed byte (to finish a UTF-8 character). The path is then re-tokenized canonically. The walk
is bounded (WALK_LIMIT); when it finds nothing the reply may end by length. It runs when the tokens
left shrink toward the last path's length (halving the gap each time): a few times per reply,
~0.5-20 ms each on the CPU (a UUID is the slowest of the tested schemas).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from .structured import Checked, ConstraintError, first_line, turn_grammar
from .tokenizer import HarmonyTokenizer

# Force the closing path when at most this many tokens beyond it are left: one more sampled token may
# lengthen the path (an escape begun, a key opened), so it is not left to the last token.
CLOSE_SLACK = 8
WALK_LIMIT = 384  # bytes the closing walk may take before it is given up
# Forced text is tokenized from at most this many of its bytes: llguidance's compute_ff_tokens
# tokenizes all of it while holding the GIL, at every step, and a schema can force a great deal
# (docs/SERVER.md, "What a schema may cost"). Only the first forced tokens are used.
FORCED_BYTES = 512
FORCED_MARGIN = 64
_SPECIAL = re.compile(rb"\xff\[(\d+)\]")  # a special token in compute_ff_bytes' text


def _quoting(state: tuple[bool, bool], data: bytes) -> tuple[bool, bool]:
    """(inside a JSON string, after a backslash) once `data` follows `state`."""
    inside, escaped = state
    for b in data:
        if escaped:
            escaped = False
        elif inside and b == 0x5C:
            escaped = True
        elif b == 0x22:
            inside = not inside
    return inside, escaped


class TurnConstraint:
    """The grammar state of one constrained reply (see the module docstring)."""

    def __init__(
        self,
        checked: Checked,
        tokenizer: HarmonyTokenizer,
        max_tokens: int,
        prefix: Iterable[int] = (),
    ):
        """prefix: tokens the reply is made to start with (they are prompt, but the grammar reads them)."""
        self.checked, self.tokenizer, self.max_tokens = checked, tokenizer, max_tokens
        self.prefix = list(prefix)
        self.matcher = None
        self.closed = False  # the closing path was forced
        self.searches = 0
        self._words = None
        self._forced: list[int] = []
        self._check_at = max_tokens  # look for the closing path when this many tokens (or fewer) are left
        self._quote = (False, False)  # where the message being written stands, as JSON text (_quoting)
        tok = tokenizer
        tok.grammar_tokenizer()  # built once per tokenizer (~1 s): here, not inside a mask's time
        byte_token = {b: tok.encoding.encode_single_token(bytes([b])) for b in range(256)}
        self._ends = [tok.RETURN, tok.CALL, tok.END]
        self._in_string = [byte_token[0x22]]
        self._outside = [byte_token[ord(c)] for c in '}],:0"[{nft-']
        self._printable = [byte_token[b] for b in range(0x20, 0x7F)]
        self._any_byte = [byte_token[b] for b in range(256)]
        # What a state allows next is probed on these bytes (a cheap stand-in for all of them): one of
        # each class patterns and formats tell apart (digits, hex, letters, separators, escapes).
        self._probes = [byte_token[ord(c)] for c in '"\\ !+-./019:@AFGTZ_afgtz{}']

    # ---- the steps the scheduler drives ----------------------------------------------------------

    def begin(self, remaining: int) -> np.ndarray:
        """Build the matcher (the reply starts after `<|start|>assistant`), feed the prefix, and return
        the first mask."""
        import llguidance
        from llguidance.numpy import allocate_token_bitmask

        grammar_tokenizer = self.tokenizer.grammar_tokenizer()
        self.matcher = llguidance.LLMatcher(
            grammar_tokenizer, turn_grammar(self.checked, self.max_tokens), log_level=0
        )
        self._raise_on_error()
        self._words = allocate_token_bitmask(1, grammar_tokenizer.vocab_size)
        for token in self.prefix:
            self._consume(token)
        return self._next(remaining)

    def advance(self, token: int, remaining: int) -> np.ndarray:
        """Take the token sampled last; return the mask for the next one (`remaining` may follow)."""
        self._consume(token)
        return self._next(remaining)

    # ---- internals -------------------------------------------------------------------------------

    def _raise_on_error(self) -> None:
        if self.matcher.is_error():
            # (which part failed is not known here: the turn's grammar holds them all)
            raise ConstraintError(f"constrained decoding failed: {first_line(self.matcher.get_error())}")

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._raise_on_error()
        self._raise_on_error()
        self._quote = self._quoted(self._quote, token)

    def _quoted(self, state: tuple[bool, bool], token: int) -> tuple[bool, bool]:
        if token == self.tokenizer.MESSAGE:  # a message's content begins
            return False, False
        if self.tokenizer.is_special(token):
            return state
        return _quoting(state, self.tokenizer.token_bytes(token))

    def _forced_tokens(self, m) -> list[int]:
        """The tokens the grammar forces next: compute_ff_tokens' own where the forced text is short,
        else those of its first FORCED_BYTES bytes that end FORCED_MARGIN bytes before the cut (the
        text goes on, and tokens near the cut may merge into others)."""
        data = m.compute_ff_bytes()
        if len(data) <= FORCED_BYTES:
            return m.compute_ff_tokens() if data else []
        data = data[:FORCED_BYTES]
        grammar_tokenizer = self.tokenizer.grammar_tokenizer()
        tokens: list[int] = []
        start = 0
        for special in _SPECIAL.finditer(data):
            tokens += grammar_tokenizer.tokenize_bytes(data[start : special.start()])
            tokens.append(int(special.group(1)))
            start = special.end()
        tail = data[start:]
        if b"\xff" in tail:  # a special token's name cut off (0xff is never UTF-8 text)
            tail = tail[: tail.find(b"\xff")]
        end = 0
        for token in grammar_tokenizer.tokenize_bytes(tail):
            end += len(self.tokenizer.token_bytes(token))
            if end > len(tail) - FORCED_MARGIN:
                break
            tokens.append(token)
        return tokens[: m.validate_tokens(tokens)] if tokens else []

    def _only(self, token: int) -> np.ndarray:
        words = np.zeros_like(self._words)
        words[0, token >> 5] = np.int32(np.uint32(1 << (token & 31)).view(np.int32))
        return words

    def _next(self, remaining: int) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        if not self._forced and remaining <= self._check_at:
            self._plan_closing(remaining)
        if self._forced:
            return self._only(self._forced.pop(0))
        forced = self._forced_tokens(self.matcher)
        if forced:  # the grammar allows one text here: take its canonical tokens, not any spelling
            return self._only(forced[0])
        fill_next_token_bitmask(self.matcher, self._words)
        self._raise_on_error()
        return self._words.copy()  # (the buffer is refilled by the next call, maybe before it is used)

    def _plan_closing(self, remaining: int) -> None:
        path = self.closing_path()
        if path is None:  # none found from here: look again a little later
            self._check_at = remaining - max(1, remaining // 8)
            return
        gap = remaining - len(path)
        if 0 <= gap <= CLOSE_SLACK:
            self._forced, self.closed = list(path), True
        elif gap < 0:
            self._check_at = -1  # it cannot fit any more: the reply will end by length
        else:
            self._check_at = remaining - max(1, (gap - CLOSE_SLACK) // 2)

    def closing_path(self) -> list[int] | None:
        """The fewest tokens found that end the turn from the current state (its last is a stop)."""
        self.searches += 1
        m = self.matcher.deep_copy()
        stops = (self.tokenizer.RETURN, self.tokenizer.CALL)
        quote = self._quote
        path: list[int] = []
        seen: set[tuple] = set()  # states the walk has been in, by what they allow next
        while len(path) < WALK_LIMIT:
            chosen = self._forced_tokens(m)
            chosen = chosen[: m.try_consume_tokens(chosen)] if chosen else []
            if not chosen:
                token = next((t for t in self._preferred(quote) if m.validate_tokens([t])), None)
                if token is not None and path[-2:] == [token, token]:  # "0.000...": a loop; step aside
                    token = self._step(m, quote, seen, avoid=token)
                elif token is None:
                    token = self._step(m, quote, seen)
                if token is None or not m.consume_token(token):
                    return None
                chosen = [token]
            for token in chosen:
                path.append(token)
                quote = self._quoted(quote, token)
                if token in stops:
                    return self._canonical(path)
        return None

    def _preferred(self, quote: tuple[bool, bool]) -> list[int]:
        return self._ends + (self._in_string if quote[0] else self._outside)

    def _signature(self, m, quote: tuple[bool, bool]) -> tuple:
        return quote, tuple(m.validate_tokens([t]) for t in self._probes)

    def _step(self, m, quote: tuple[bool, bool], seen: set[tuple], avoid: int | None = None) -> int | None:
        """A byte that leads somewhere new: the first allowed printable byte after which the state
        allows a set of next bytes not met before in this walk (so `a@b` rather than `aaaa...` in an
        email, `0.01` rather than `0.000...`), else the first allowed one, else any allowed byte (to
        finish a UTF-8 character)."""
        seen.add(self._signature(m, quote))
        first = None
        for t in self._printable:
            if t == avoid or not m.validate_tokens([t]):
                continue
            first = t if first is None else first
            child = m.deep_copy()
            child.consume_token(t)
            signature = self._signature(child, self._quoted(quote, t))
            if signature not in seen:
                return t
        if first is not None:
            return first
        return next((t for t in self._any_byte if t != avoid and m.validate_tokens([t])), None)

    def _canonical(self, path: list[int]) -> list[int]:
        """The path's text in the tokenizer's own tokens (fewer than the walk's single bytes), if the
        matcher takes them; else the path as found."""
        tok, out, run = self.tokenizer, [], bytearray()
        grammar_tokenizer = tok.grammar_tokenizer()
        for token in path:
            if tok.is_special(token):
                if run:
                    out += grammar_tokenizer.tokenize_bytes(bytes(run))
                    run = bytearray()
                out.append(token)
            else:
                run += tok.token_bytes(token)
        if run:
            out += grammar_tokenizer.tokenize_bytes(bytes(run))
        if len(out) >= len(path):
            return path
        trial = self.matcher.deep_copy()
        return out if trial.try_consume_tokens(out) == len(out) else path
