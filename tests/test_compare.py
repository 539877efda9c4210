"""``python -m pni.refinement.compare BEFORE AFTER``: the before -> after table of two analysed
ravel folders, and one error line for tables it cannot read."""

import pytest

from pni.refinement.compare import main

HEADER = "category,num_images,I-AUROC,P-AUROC,AUPRO_MVTec,AUPRO_PNI\n"


def table(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score_result.csv").write_text(text)
    return folder


def test_before_and_after_side_by_side(tmp_path, capsys):
    before = table(tmp_path / "b", HEADER + "board,8,1.0,0.9970,0.9899,0.98985\nstripes,8,1.0,0.9661,0.8957,\n")
    after = table(tmp_path / "a", HEADER + "stripes,8,0.9375,0.9625,0.8845,0.8843\nboard,8,1.0,0.997,0.99,0.9899\n")
    assert main([str(before), str(after)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}  # title, header, then one row a category
    assert rows["board"] == [
        "99.70",
        "->",
        "99.70",
        "98.99",
        "->",
        "99.00",
        "98.98",
        "->",
        "98.99",
        "100.00",
        "->",
        "100.00",
    ]
    assert rows["stripes"] == [
        "96.61",
        "->",
        "96.25",
        "89.57",
        "->",
        "88.45",
        "n/a",
        "->",
        "88.43",
        "100.00",
        "->",
        "93.75",
    ]  # an empty cell (metric not computed): n/a


@pytest.mark.parametrize(
    "text, fragment",
    [
        (HEADER, "has no rows"),
        ("name,P-AUROC\nboard,0.9\n", "has no category column"),
    ],
)
def test_unreadable_tables_are_one_line(tmp_path, capsys, text, fragment):
    before = table(tmp_path / "b", text)
    after = table(tmp_path / "a", HEADER + "board,8,1.0,0.99,0.98,0.98\n")
    assert main([str(before), str(after)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err and str(before) in err


def test_no_common_category_and_missing_table(tmp_path, capsys):
    before = table(tmp_path / "b", HEADER + "board,8,1.0,0.99,0.98,0.98\n")
    after = table(tmp_path / "a", HEADER + "texture,8,1.0,0.99,0.98,0.98\n")
    assert main([str(before), str(after)]) == 2
    assert "no category in common" in capsys.readouterr().err
    assert main([str(before), str(tmp_path / "nowhere")]) == 2
    assert "missing" in capsys.readouterr().err
