"""The label id every loss and metric skips: padding, and prompt tokens where the loss is on responses only."""

IGNORE_INDEX = -100
