// Drives Debian's Chromium (headless, through playwright-core) against a running
// `runner serve`: fills the playground's form, runs a prediction, checks what the page
// shows, then triggers a validation error and checks it appears beside its field.
//
//   node playground.mjs SCENARIO BASE_URL OUT_DIR
//
// SCENARIO: embedding (MiniLM), textgen (SmolLM2, streamed), conformance (every input
// kind). Prints one JSON line of findings on success; exits 1 with the reason otherwise.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [scenario, base, outDir] = process.argv.slice(2);
if (!scenario || !base || !outDir) {
  console.error("usage: node playground.mjs embedding|textgen|conformance BASE_URL OUT_DIR");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });
const executablePath = process.env.RUNNER_CHROMIUM || "/usr/bin/chromium";
const findings = { scenario };

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
try {
  // A phone-width viewport for one scenario, a desktop for the others.
  const viewport = scenario === "conformance" ? { width: 390, height: 844 } : { width: 1280, height: 900 };
  const page = await browser.newPage({ viewport });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(base) && !r.url().startsWith("data:")) external.push(r.url()); });

  await page.goto(`${base}/playground`);
  if (scenario === "apikey") {
    // The page asks for the key, says when it is refused, then works with it.
    await page.waitForSelector("#key-form:not([hidden])", { timeout: 30000 });
    await page.fill("#api-key", "not-the-key");
    await page.click("#key-form button");
    await page.waitForFunction(() => document.querySelector("#key-error").textContent.includes("refused"), null, { timeout: 30000 });
    await page.fill("#api-key", process.env.RUNNER_TEST_API_KEY);
    await page.click("#key-form button");
  }
  await page.waitForSelector("body[data-ready=true]", { timeout: 30000 });
  const waitStatus = async (want, timeout = 120000) => {
    await page.waitForFunction((w) => document.querySelector("#status").dataset.status === w, want, { timeout });
  };

  if (scenario === "embedding") {
    check(await page.isVisible("#in-text"), "a field for `text`");
    check((await page.textContent("label[for=in-text]")).includes("Text"), "the field's title");
    check(await page.isChecked("#in-normalize"), "`normalize` defaults to checked");
    await page.fill("#in-text", "The cat sits outside");
    await page.click("#run");
    await waitStatus("succeeded");
    const output = JSON.parse(await page.textContent("#output pre.json"));
    check(Array.isArray(output) && output.length === 384, `a 384-number vector, got ${JSON.stringify(output).slice(0, 80)}`);
    findings.first_values = output.slice(0, 3);
    check((await page.textContent("#output")).includes("384 numbers"), "the vector's size is named");
    check((await page.textContent("#timing")).includes("predict_time"), "predict_time is shown");
    check((await page.textContent("#logs")).includes("embedded 1 text"), "the prediction's logs are shown");
    const curl = await page.textContent("#curl");
    check(curl.includes(`${base}/predictions`) && curl.includes("The cat sits outside"), `curl command: ${curl}`);
    const runLine = await page.textContent("#runner-run");
    check(runLine.includes("runner run") && runLine.includes("-i 'text=The cat sits outside'"), `runner run command: ${runLine}`);
    check(page.url().includes("text=The+cat+sits+outside"), `inputs in the address: ${page.url()}`);
    findings.share_url = page.url();
    await page.screenshot({ path: join(outDir, "playground-embedding.png"), fullPage: true });

    // The shared link reproduces the form.
    const again = await browser.newPage({ viewport });
    await again.goto(page.url());
    await again.waitForSelector("body[data-ready=true]");
    check((await again.inputValue("#in-text")) === "The cat sits outside", "the link fills the form");
    await again.close();

    // A required input left empty: the server's 422 shows beside the field.
    await page.fill("#in-text", "");
    await page.click("#run");
    await page.waitForFunction(() => document.querySelector("#in-text-err").textContent !== "", null, { timeout: 30000 });
    findings.validation_error = await page.textContent("#in-text-err");
    check(/required/i.test(findings.validation_error), `the error names what is wrong: ${findings.validation_error}`);
    check(await page.getAttribute("#in-text", "aria-invalid") === "true", "the field is marked invalid");
  } else if (scenario === "textgen") {
    check(await page.isVisible("#in-prompt"), "a field for `prompt`");
    check(await page.getAttribute("#in-max_new_tokens", "max") === "4096", "max_new_tokens carries its maximum");
    await page.fill("#in-prompt", "What is the capital of France?");
    await page.fill("#in-max_new_tokens", "12");
    await page.fill("#in-temperature", "0");
    // Streamed: text appears while the prediction is still processing (recorded by a
    // mutation observer, so no poll can miss it).
    await page.evaluate(() => {
      window.sawPartial = false;
      new MutationObserver(() => {
        const text = document.querySelector("#output pre.text");
        if (text && text.textContent.length > 0 && document.querySelector("#status").dataset.status === "processing") window.sawPartial = true;
      }).observe(document.querySelector("#output"), { childList: true, subtree: true, characterData: true });
    });
    await page.click("#run");
    await waitStatus("succeeded");
    findings.saw_partial_output = await page.evaluate(() => window.sawPartial);
    findings.text = await page.textContent("#output pre.text");
    check(findings.text.length > 0, "generated text is shown");
    check((await page.textContent("#metrics")).includes("output_token_count"), "token metrics are shown");
    check((await page.textContent("#curl")).includes("text/event-stream"), "the curl command streams");
    await page.screenshot({ path: join(outDir, "playground-textgen.png"), fullPage: true });

    await page.fill("#in-max_new_tokens", "5000");
    await page.click("#run");
    await page.waitForFunction(() => document.querySelector("#in-max_new_tokens-err").textContent !== "", null, { timeout: 30000 });
    findings.validation_error = await page.textContent("#in-max_new_tokens-err");
    check(/4096/.test(findings.validation_error), `the error gives the limit: ${findings.validation_error}`);
  } else if (scenario === "conformance") {
    // Every Cog input kind gets its control.
    check(await page.getAttribute("#in-count", "type") === "number", "integer → number input");
    check(await page.getAttribute("#in-count", "min") === "1" && await page.getAttribute("#in-count", "max") === "10", "min/max carried");
    check(await page.evaluate(() => document.querySelector("#in-color").tagName) === "SELECT", "choices → select");
    check(await page.getAttribute("#in-flag", "type") === "checkbox", "boolean → checkbox");
    check(await page.getAttribute("#in-api_key", "type") === "password", "secret → password field");
    check(await page.evaluate(() => document.querySelector("#in-tags").tagName) === "TEXTAREA", "list of strings → textarea");
    check((await page.inputValue("#in-count")) === "3", "defaults filled in");
    const order = await page.$$eval("#fields .field", (fs) => fs.map((f) => f.dataset.name));
    check(order.join(",") === "text,count,ratio,flag,color,size,code,api_key,note,tags,legacy,sleep,fail", `x-order: ${order}`);
    await page.fill("#in-text", "hi");
    await page.fill("#in-count", "2");
    await page.selectOption("#in-color", { label: "blue" });
    await page.fill("#in-api_key", "s3cret");
    await page.click("#run");
    await waitStatus("succeeded");
    const out = JSON.parse(await page.textContent("#output pre.json"));
    check(out.text === "hihi" && out.color === "blue" && out.api_key_length === 6, `output ${JSON.stringify(out)}`);
    check(!page.url().includes("s3cret"), "secrets stay out of the address");
    // A failed prediction shows its error; a long one can be canceled from the page.
    await page.check("#in-fail");
    await page.click("#run");
    await waitStatus("failed");
    check((await page.textContent("#output .error")).includes("on purpose"), "the error is shown");
    await page.uncheck("#in-fail");
    await page.fill("#in-sleep", "60");
    await page.click("#run");
    await page.waitForSelector("#cancel:not([hidden])");
    await page.waitForTimeout(300);
    await page.click("#cancel");
    await waitStatus("canceled", 30000);
    findings.canceled = true;
    await page.fill("#in-sleep", "0");
    // Two errors at once, each beside its own field.
    await page.fill("#in-count", "99");
    await page.fill("#in-code", "12ab");
    await page.click("#run");
    await page.waitForFunction(() => document.querySelector("#in-count-err").textContent !== "" && document.querySelector("#in-code-err").textContent !== "", null, { timeout: 30000 });
    findings.validation_error = [await page.textContent("#in-count-err"), await page.textContent("#in-code-err")];
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    check(width <= 390, `no sideways scrolling on a phone-width screen (page is ${width}px wide)`);
    await page.screenshot({ path: join(outDir, "playground-phone.png"), fullPage: true });
  } else if (scenario === "apikey") {
    check(await page.isHidden("#key-form"), "the key form goes away once the key works");
    await page.fill("#in-text", "hi");
    await page.click("#run");
    await waitStatus("succeeded");
    const curl = await page.textContent("#curl");
    check(curl.includes("Authorization: Bearer $RUNNER_API_KEY"), `curl sends the key by name: ${curl}`);
    check(!curl.includes(process.env.RUNNER_TEST_API_KEY), "the key itself is not shown");
    findings.ran_with_key = true;
  } else if (scenario === "files") {
    // A file picked in the browser goes as a data URI; file outputs are shown.
    check(await page.getAttribute("#in-source", "type") === "file", "format: uri → file picker");
    await page.setInputFiles("#in-source", { name: "poem.txt", mimeType: "text/plain", buffer: Buffer.from("roses\nviolets\n") });
    await page.fill("#in-copies", "2");
    await page.click("#run");
    await waitStatus("succeeded");
    const shown = await page.$$eval("#output pre.file-text", (ps) => ps.map((p) => p.textContent));
    check(shown.length === 2, `two output files shown, got ${shown.length}`);
    check(shown[0].includes("> roses"), `the file's text: ${shown[0]}`);
    findings.file_text = shown[0];
    const runLine = await page.textContent("#runner-run");
    check(runLine.includes("-i 'source=@poem.txt'"), `runner run names the file: ${runLine}`);
  } else if (scenario === "training") {
    // A training server's page is train()'s form, posted to /trainings.
    check(await page.isVisible("#in-steps"), "a field for train()'s `steps`");
    check(!(await page.isVisible("#in-text")), "no field for predict()'s `text`");
    await page.fill("#in-steps", "2");
    await page.fill("#in-word", "ab");
    await page.click("#run");
    await waitStatus("succeeded");
    const output = await page.textContent("#output");
    check(output.includes("steps") && output.includes("weights"), `the training's output: ${output.slice(0, 200)}`);
    const curl = await page.textContent("#curl");
    check(curl.includes("/trainings"), `curl posts to /trainings: ${curl}`);
    const runLine = await page.textContent("#runner-run");
    check(runLine.includes("--mode train"), `runner run trains: ${runLine}`);
    findings.output = output.slice(0, 300);
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
  check(pageErrors.length === 0, `no script errors: ${pageErrors.join("; ")}`);
  check(external.length === 0, `no requests beyond the server: ${external.join(", ")}`);
  console.log(JSON.stringify(findings));
} catch (e) {
  console.error(`${scenario}: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
