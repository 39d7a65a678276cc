"""The web chat page in headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): attach a picture, set greedy decoding, ask a question, wait for the streamed answer;
prints {"answer"} as JSON and saves a screenshot. xtask/tests/serve.rs compares the answer with
the API's for the same request."""

import argparse
import json
import os
import shutil

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--screenshot", required=True)
    args = ap.parse_args()

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    # Headless, and no background connections: this machine has no network to reach.
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,900"]:
        options.add_argument(flag)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(args.url + "/")
        driver.find_element(By.ID, "image-input").send_keys(os.path.realpath(args.image))
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.ID, "image-preview").get_attribute("src").startswith("data:"))
        for field, value in [("temperature", "0"), ("max_tokens", str(args.max_tokens))]:
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys(args.question)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(
            By.CSS_SELECTOR, ".msg.assistant[data-state=done], #error"))
        errors = driver.find_elements(By.ID, "error")
        if errors:
            raise SystemExit("the page shows an error: " + errors[0].text)
        answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant[data-state=done]")
        text = driver.execute_script("return arguments[0].textContent", answer)
        driver.save_screenshot(args.screenshot)
        print(json.dumps({"answer": text}))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
