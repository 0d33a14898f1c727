"""Stop strings over streamed text: text that could still begin a stop string is held back until decided."""

from typing import List, Sequence, Tuple


class StopStringStream:
    """Detokenized text and its tokens, released once no stop string can begin in them (as mlx-lm's server
    holds back a possible stop-string prefix); a stop string cuts the text and the tokens after it."""

    def __init__(self, detokenizer, stops: Sequence[str]):
        self.detokenizer = detokenizer
        self.stops = tuple(stops)
        self.text = ""  # everything decoded so far
        self.released = 0  # characters of `text` handed out
        self.pending: List[Tuple[int, int]] = []  # (token, offset where its text starts), not handed out yet
        self.stopped = False

    def add(self, token: int) -> None:
        self.detokenizer.add_token(token)
        self.pending.append((token, len(self.text)))
        self.text += self.detokenizer.last_segment

    def release(self, final: bool) -> Tuple[str, List[int]]:
        """The text and tokens decided now; with `final`, all that is left up to any stop string."""
        if final:
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
        cut = self._first_stop()
        self.stopped = cut is not None
        if cut is None:
            cut = len(self.text) if final else len(self.text) - self._possible_stop_start()
        everything = final and not self.stopped  # tokens that decode to no text go out too
        tokens = [token for token, start in self.pending if everything or start < cut]
        self.pending = self.pending[len(tokens) :]
        segment = self.text[self.released : cut]
        self.released = max(self.released, cut)
        return segment, tokens

    def _first_stop(self):
        found = [self.text.find(stop, self.released) for stop in self.stops]
        found = [index for index in found if index >= 0]
        return min(found) if found else None

    def _possible_stop_start(self) -> int:
        """Characters at the end of the unreleased text that begin some stop string."""
        unreleased = self.text[self.released :]
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(unreleased)), longest, -1):
                if unreleased.endswith(stop[:length]):
                    longest = length
                    break
        return longest
