"""Tools for testing Bazar under simulated clients: a history of operations as
clients saw them, and a checker that decides whether a history is linearizable."""
