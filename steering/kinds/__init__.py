"""The policy kinds, one module each: `plain` (steering only), `abstention` (withhold a weak
answer), `decision` (the Bayes action over labels). Each takes an admitted `Plan` and yields
answer pieces, then the `Outcome`; `answer` runs one to its end."""

from steering.kinds.abstention import AbstentionRule
from steering.kinds.answer import Evidence, Outcome, Piece, answer, joined
from steering.kinds.decision import DecisionRule
from steering.kinds.plain import Plain

Rule = Plain | AbstentionRule | DecisionRule

__all__ = ["AbstentionRule", "DecisionRule", "Evidence", "Outcome", "Piece", "Plain", "Rule", "answer", "joined"]
