"""What a console script owes a user's mistake, checked the same way by every CLI test."""


def fails_in_one_line(main, capsys, argv, match: str) -> None:
    """``main(argv)`` returns 2 and writes one stderr line, with ``match`` in it and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert match in err, err
