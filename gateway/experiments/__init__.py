"""Comparing adapters: routes (live splits), the feedback store, ratings, and one request fanned out to many."""
