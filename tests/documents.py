"""Real documents generated for the loader/chunking/ingest tests (fpdf2, python-docx, python-pptx, openpyxl).

Each fact lives in one known place (page, heading path), so tests can check where a chunk came from.
"""

from __future__ import annotations

from pathlib import Path

FILLER = ("The handbook explains the usual process in plain words, with examples for every team "
          "and a short summary at the end of each part. ")

PDF_FACT = "Refunds for damaged goods are paid within 9 working days"
PDF_QUESTION = "How many working days until a refund for damaged goods is paid?"
HTML_FACT = "The choir rehearses every Thursday at 19:30 in the old library hall"
HTML_QUESTION = "On which day and in which library hall does the choir rehearse?"
DOCX_FACT = "Revenue in the northern region grew by 17 percent in the third quarter"
DOCX_QUESTION = "How much did revenue in the northern region grow in the third quarter?"


def write_pdf(path: Path, *, outline: bool = True) -> Path:
    """Two pages: 'Handbook' (h1) and 'Shipping' on page 1; 'Refunds' (h2) with the fact on page 2."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title("Staff handbook")

    def heading(text: str, level: int, size: int) -> None:
        if outline:
            pdf.start_section(text, level=level - 1)
        pdf.set_font("Helvetica", "B", size)
        pdf.cell(0, 10, text, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=11)

    def para(text: str) -> None:
        pdf.multi_cell(0, 6, text=text, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)

    pdf.add_page()
    heading("Handbook", 1, 20)
    para("This handbook is for every member of staff. " + FILLER)
    heading("Shipping", 2, 15)
    para("Parcels leave the warehouse every weekday before noon. " + FILLER * 2)
    pdf.add_page()
    heading("Refunds", 2, 15)
    para(f"{PDF_FACT}, counted from the day the parcel is back in the warehouse. " + FILLER)
    pdf.output(str(path))
    return path


def write_blank_pdf(path: Path, pages: int = 2) -> Path:
    """Pages with a drawn rectangle and no text layer, like a scan."""
    from fpdf import FPDF

    pdf = FPDF()
    for _ in range(pages):
        pdf.add_page()
        pdf.rect(20, 20, 100, 60, style="F")
    pdf.output(str(path))
    return path


def write_encrypted_pdf(path: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_encryption(owner_password="owner", user_password="secret")
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.cell(0, 10, "Confidential text", new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path


def write_html(path: Path) -> Path:
    """A page with navigation, a script, a footer and the fact under 'Choir › Rehearsals'."""
    path.write_text(f"""<!doctype html>
<html><head><title>Choir handbook</title><script>var tracking = "NAVSCRIPT";</script>
<style>body {{ color: #333 }}</style></head>
<body>
<nav><a href="/">Home</a> | <a href="/news">News</a> | <a href="/shop">Shop menu item</a></nav>
<header><p>Welcome banner of the website</p></header>
<main><article>
<h1>Choir</h1>
<p>The choir is open to every singer of the town; no audition is needed. {FILLER}</p>
<h2>Rehearsals</h2>
<p>{HTML_FACT}. Bring your folder and a pencil. {FILLER}</p>
<h2>Fees</h2>
<table><tr><th>Member</th><th>Fee</th></tr><tr><td>Adult</td><td>10 EUR</td></tr>
<tr><td>Student</td><td>5 EUR</td></tr></table>
</article></main>
<footer><p>Copyright footer text 2026</p></footer>
</body></html>""", encoding="utf-8")
    return path


def write_docx(path: Path) -> Path:
    """'Annual report' (h1) › 'Regions' (h2) with the fact, and a table under 'Figures'."""
    import docx

    document = docx.Document()
    document.add_heading("Annual report", level=1)
    document.add_paragraph("This report covers the year for the whole company. " + FILLER)
    document.add_heading("Regions", level=2)
    document.add_paragraph(f"{DOCX_FACT}, driven by new customers. " + FILLER)
    document.add_heading("Figures", level=2)
    table = document.add_table(rows=4, cols=2)
    for row, (region, value) in enumerate([("Region", "Growth"), ("North", "17%"), ("South", "4%"),
                                           ("West", "9%")]):
        table.cell(row, 0).text, table.cell(row, 1).text = region, value
    document.save(str(path))
    return path


def write_pptx(path: Path) -> Path:
    from pptx import Presentation

    deck = Presentation()
    for title, body in [("Kick-off", "Goals for the year."), ("Budget", "The travel budget is 4200 EUR.")]:
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
    deck.save(str(path))
    return path


def write_xlsx(path: Path) -> Path:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "Stock"
    for row in [("Item", "Count"), ("Pens", 120), ("Folders", 35)]:
        sheet.append(row)
    book.save(str(path))
    return path


def write_markdown(path: Path) -> Path:
    path.write_text("# Office\n\n## Keys\n\nThe spare office key is kept in the blue box at reception.\n",
                    encoding="utf-8")
    return path
