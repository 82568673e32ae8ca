"""mile.multiple_choice: the task-converter table (no model needed)."""

import pytest

from mile import multiple_choice as MC

ARC = {"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "B"}


def test_every_layout_has_a_converter_and_the_error_lists_them():
    assert list(MC.TASK_CONVERTERS) == [
        "hellaswag",
        "piqa",
        "winogrande",
        "arc",
        "openbookqa",
        "boolq",
        "siqa",
        "storycloze",
    ]
    with pytest.raises(ValueError) as e:
        MC.convert_task("MMLU", {})
    assert str(e.value) == (
        "unknown task layout 'mmlu'; use one of hellaswag, piqa, winogrande, arc, openbookqa, boolq, "
        "siqa, storycloze."
    )


@pytest.mark.parametrize("name", ["arc", "arc_easy", "arc_challenge", "ARC_Challenge"])
def test_arc_names_share_one_layout_in_any_case(name):
    expected = {"context": "Question: q\nAnswer:", "choices": [" a", " b", " c"], "gold": 1}
    assert MC.convert_task(name, ARC) == expected


def test_converted_examples_pass_the_task_file_check():
    records = {
        "hellaswag": {"activity_label": "", "ctx": "He cuts", "endings": ["a", "b"], "label": 0},
        "piqa": {"goal": "g", "sol1": "x", "sol2": "y", "label": "1"},
        "boolq": {"passage": "p", "question": "q", "answer": False},
        "siqa": {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "x", "label": 1},
    }
    hellaswag = MC.convert_task("hellaswag", records["hellaswag"])
    assert hellaswag["context"] == "He cuts"  # an empty activity label adds no "label: " prefix
    assert MC.convert_task("piqa", records["piqa"])["choices"] == [" x", " y"]
    assert MC.convert_task("boolq", records["boolq"]) == {
        "context": "p\nQuestion: q?\nAnswer:",
        "choices": [" no", " yes"],
        "gold": 0,
    }
    for name, record in records.items():
        MC._check_example(MC.convert_task(name, record), name)


def test_bad_records_fail_on_the_missing_field():
    with pytest.raises(KeyError, match="endings"):
        MC.convert_task("hellaswag", {"ctx": "x", "label": 0})
    with pytest.raises(ValueError, match="'Z' is not in list"):
        MC.convert_task("arc", dict(ARC, answerKey="Z"))
    with pytest.raises(ValueError, match="substring not found"):  # no blank to fill
        MC.convert_task("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"})
