"""`make fuzz`: a seeded mutation fuzzer for wgvsock's parsers and protocol core.

harness.py runs one shard of one target (crash files, the hang watchdog); mutate.py holds the
byte and text mutators; core.py, framing.py, uapi.py, control.py and profile.py are the
targets; __main__.py spreads the shards over processes and prints the counts.
"""
