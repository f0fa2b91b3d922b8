"""Run directories: the lock and accepted .hydra files (:mod:`.directory`), metrics.json (:mod:`.summary`),
statistics over runs that differ only by seed or fold (:mod:`.seed_stats`), tags and notes (:mod:`.tags`)."""
