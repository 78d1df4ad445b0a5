"""Ranking candidate backbones before fine-tuning: transferability scores of cached frozen features, checked
against the runs that measured them (`python -m src.rank`)."""
