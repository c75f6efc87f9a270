import pytest

from data_prep.text_clean import clean_wiki_text, has_math, normalize_line, split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        ("今日は晴れ。明日は雨。", ["今日は晴れ。", "明日は雨。"]),
        ("「行くよ。」と彼は言った。次の文。", ["「行くよ。」と彼は言った。", "次の文。"]),
        ("『本の題。副題。』を読んだ。終わり。", ["『本の題。副題。』を読んだ。", "終わり。"]),
        ("彼は(注:括弧の中。ここも。)と書いた。次。", ["彼は(注:括弧の中。ここも。)と書いた。", "次。"]),
        ("【重要。】告知です。", ["【重要。】告知です。"]),
        ("「外『内。』外。」終わり。次。", ["「外『内。』外。」終わり。", "次。"]),
        ("本当?それは嘘!次。", ["本当?", "それは嘘!", "次。"]),
        ("Yahoo!ニュースで見た。値は3.14です。", ["Yahoo!ニュースで見た。", "値は3.14です。"]),
        ("ええ!? そうなの。。次", ["ええ!?", "そうなの。。", "次"]),
        # an unmatched bracket must not swallow the rest of the paragraph
        ("彼は「未完の引用。そして続く。", ["彼は「未完の引用。", "そして続く。"]),
        ("1)最初。2)次。", ["1)最初。", "2)次。"]),
        ("終わりのない文", ["終わりのない文"]),
        ("", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(normalize_line(text)) == expected


def test_normalize_line():
    assert normalize_line("ＡＢＣ\t１２３\x07  x\u200b y ") == "ABC 123 x y"
    assert normalize_line("（全角）！") == "(全角)!"


def test_clean_wiki_text():
    text = ("この項目では、東京について説明しています。その他の用法については「東京 (曖昧さ回避)」をご覧ください。"
            "東京都[1]は日本の首都である[要出典]。{{基礎情報|名前={{入れ子}}}}人口は多い[注 2][リンク切れ]。"
            "範囲[3-5]と[12,13]。 脚注 ^ 出典の本 参考文献 本 外部リンク 公式")
    assert clean_wiki_text(text) == "東京都は日本の首都である。人口は多い。範囲と。"
    assert clean_wiki_text("地理 > 日本 > 東京都は首都である。") == "東京都は首都である。"
    assert clean_wiki_text("残った}}テンプレート{{の端。") == "残ったテンプレートの端。"
    # a plain article keeps everything
    plain = "京都は古い都である。「千年の都。」と呼ばれる。"
    assert clean_wiki_text(plain) == plain
    assert has_math("式は {\\displaystyle x^{2}} である。") and not has_math(plain)
