"""templates.py: exact text of each format and which segments are trained on."""

from sftjax.data import templates
from sftjax.data.records import Row
from sftjax.data.templates import Segment


def test_alpaca_without_input():
    row = Row("f:1", instruction="Say hi", input="  ", response="Hi")
    assert templates.alpaca(row) == [
        Segment("### Instruction:\nSay hi\n\n### Response:\n", False),
        Segment("Hi", True),
    ]


def test_alpaca_with_input():
    row = Row("f:1", instruction="Add", input="1 2", response="3")
    segments = templates.alpaca(row)
    assert templates.render(segments) == (
        "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n3"
    )
    assert [s.trainable for s in segments] == [False, True]


def test_chat_every_assistant_turn_trainable():
    row = Row(
        "f:1",
        messages=(
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Bye"),
            ("assistant", "Bye!"),
        ),
    )
    assert templates.chat(row) == [
        Segment("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", False),
        Segment(" Hello", True),
        Segment("[INST] Bye [/INST]", False),
        Segment(" Bye!", True),
    ]


def test_a_new_template_is_one_function():
    def qa(row: Row) -> list[Segment]:
        return [Segment(f"Q: {row.instruction}\nA:", False), Segment(f" {row.response}", True)]

    assert templates.render(qa(Row("f:1", instruction="2+2?", response="4"))) == "Q: 2+2?\nA: 4"
    assert set(templates.TEMPLATES) == {"alpaca", "chat"}
