"""The policy kinds, one module each: `plain` (steering only), `abstention` (withhold a weak
answer), `decision` (the Bayes action over labels). Each takes an admitted `Plan` and yields
answer pieces, then the `Outcome` (`run`); `answer` runs one to its end."""

from steering.kinds.abstention import AbstentionRule
from steering.kinds.decision import DecisionRule
from steering.kinds.plain import Plain
from steering.kinds.run import Evidence, Kind, Outcome, Piece, Plan, Steering, answer, joined

__all__ = ["AbstentionRule", "DecisionRule", "Evidence", "Kind", "Outcome", "Piece", "Plain", "Plan", "Steering",
           "answer", "joined"]
