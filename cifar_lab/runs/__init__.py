"""Run directories: the lock and accepted .hydra files (:mod:`.directory`), metrics.json (:mod:`.summary`),
and statistics over runs that differ only by seed (:mod:`.seed_stats`)."""
